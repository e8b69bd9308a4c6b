"""Ordering a computation graph so that backward visits every node after its users.

Both engines store, on each result, the tuple of nodes it was computed from
(``_prev``). Backward must handle a node only once every node that used it has passed
its gradient down, which is a reverse topological order. A recursive depth-first
search would hit Python's recursion limit (1,000 frames) on a chain of a few thousand
operations, so this one keeps its own stack and handles graphs of any depth.
"""

from __future__ import annotations

from typing import Any

__all__ = ["topological_order"]


def topological_order(root: Any) -> list[Any]:
    """Every node reachable from ``root`` through ``_prev``, inputs before results.

    The last element is ``root``; each node appears after all the nodes it was
    computed from. Iterative: the depth of the graph does not matter.

    >>> class N:
    ...     def __init__(self, name, *prev): self.name, self._prev = name, prev
    >>> a = N("a"); b = N("b", a); c = N("c", a, b)
    >>> [n.name for n in topological_order(c)]
    ['a', 'b', 'c']
    """
    order: list[Any] = []
    visited: set[int] = set()
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if children_done:
            order.append(node)  # all its inputs are already in `order`
            continue
        if id(node) in visited:
            continue
        visited.add(id(node))
        stack.append((node, True))
        for child in node._prev:
            if id(child) not in visited:
                stack.append((child, False))
    return order
