"""Drawing a small scalar computation graph with matplotlib (no graphviz needed).

Each ``Value`` is a box showing its label, ``data`` and ``grad``; each operation is a
small circle between its inputs and its result. Columns are depths: inputs on the left,
the output on the right.
"""

from __future__ import annotations

from typing import Any

from companion.autodiff.graph import topological_order

__all__ = ["draw_graph", "graph_layout"]


def graph_layout(root: Any) -> dict[int, tuple[float, float]]:
    """Position ``(column, row)`` of every node, keyed by ``id(node)``.

    The column is the node's depth (longest path from an input; an input sits just left
    of its first user); rows spread the nodes of a column evenly around 0.
    """
    order = topological_order(root)
    depth: dict[int, int] = {}
    for node in order:  # inputs come first, so their depth is known
        depth[id(node)] = 1 + max((depth[id(p)] for p in node._prev), default=-1)
    for node in reversed(order):  # an input sits just left of its first user
        if not node._prev:
            users = [depth[id(n)] for n in order if any(p is node for p in n._prev)]
            depth[id(node)] = min(users, default=1) - 1
    columns: dict[int, list[Any]] = {}
    for node in order:
        columns.setdefault(depth[id(node)], []).append(node)
    pos = {}
    for col, nodes in columns.items():
        for row, node in enumerate(nodes):
            pos[id(node)] = (float(col), (len(nodes) - 1) / 2 - row)
    return pos


def draw_graph(root: Any, ax: Any = None, title: str | None = None) -> Any:
    """Draw the graph that produced ``root`` (a ``Value``) and return the matplotlib axes.

    Call ``root.backward()`` first to see gradients on the boxes.
    """
    import matplotlib.pyplot as plt

    pos = graph_layout(root)
    order = topological_order(root)
    n_cols = 1 + max(x for x, _ in pos.values())
    n_rows = max(sum(1 for x, _ in pos.values() if x == c) for c in range(int(n_cols)))
    if ax is None:
        _, ax = plt.subplots(figsize=(min(8, 2.4 * n_cols), min(4, 1.0 + 0.9 * n_rows)))
    sx, sy = 2.0, 1.2  # spacing between columns and rows
    boxes: dict[int, Any] = {}
    arrow = dict(arrowstyle="->", color="gray", shrinkA=4, shrinkB=4)
    for node in order:
        x, y = pos[id(node)]
        x, y = x * sx, y * sy
        name = f"{node.label}\n" if node.label else ""
        text = f"{name}data {node.data:.4f}\ngrad {node.grad:.4f}"
        boxes[id(node)] = ax.text(
            x, y, text, ha="center", va="center", fontsize=8, family="monospace",
            bbox=dict(boxstyle="round,pad=0.3", fc="#eef3fb", ec="#3b6fb6"))
        if node._prev:
            # The operation sits half-way between the previous column and the result.
            op = ax.text(x - 0.5 * sx, y, node._op, ha="center", va="center", fontsize=8,
                         bbox=dict(boxstyle="circle,pad=0.2", fc="#fdf1dc", ec="#c98a1a"))
            ax.annotate("", xy=(0, 0.5), xycoords=boxes[id(node)], xytext=(1, 0.5),
                        textcoords=op, arrowprops=arrow)
            for parent in node._prev:
                ax.annotate("", xy=(0, 0.5), xycoords=op, xytext=(1, 0.5),
                            textcoords=boxes[id(parent)], arrowprops=arrow)
    xs = [p[0] * sx for p in pos.values()]
    ys = [p[1] * sy for p in pos.values()]
    ax.set_xlim(min(xs) - 0.45 * sx, max(xs) + 0.45 * sx)
    ax.set_ylim(min(ys) - 0.6 * sy, max(ys) + 0.6 * sy)
    ax.axis("off")
    ax.set_title(title or "Computation graph: data and gradient of each node")
    return ax
