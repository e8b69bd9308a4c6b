"""Attention as message passing on a directed graph.

Each node holds a vector. In one round every node asks its in-neighbours a question (its
query), scores each by how well that neighbour's key matches, turns the scores into
weights with a softmax, and adds the weighted sum of their values to its own vector.
Written as a loop over nodes (:func:`message_passing_round`), that is a graph algorithm;
written with matrices (:func:`attention_round`), it is masked self-attention, with the
graph's adjacency matrix as the mask. The two give the same numbers (tested).

Conventions used throughout: an edge ``(src, dst)`` sends a message from ``src`` to
``dst``; a mask is a boolean ``(N_receivers, N_senders)`` matrix whose entry ``[i, j]``
is True when node ``i`` reads node ``j``, the layout of an attention matrix (row = query).
A node with no in-neighbours receives nothing: its update is zero and it keeps its
vector, in both forms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "Block",
    "Node",
    "adjacency_mask",
    "attention_round",
    "bipartite_mask",
    "causal_mask",
    "complete_mask",
    "draw_graph",
    "draw_mask",
    "edges_of",
    "make_nodes",
    "masked_attention",
    "message_passing_round",
    "random_edges",
]

Edge = tuple[int, int]


@dataclass(eq=False)  # tensors do not compare as one bool
class Node:
    """A node of the graph: the vector it holds and the three maps it talks with.

    ``data`` is ``(C,)``; ``w_query`` and ``w_key`` are ``(D, C)``; ``w_value`` is ``(C, C)``
    so that a message can be added to ``data`` (the residual update).
    """

    data: Tensor
    w_query: Tensor
    w_key: Tensor
    w_value: Tensor

    def query(self) -> Tensor:
        """What am I looking for? ``(D,)``"""
        return self.w_query @ self.data

    def key(self) -> Tensor:
        """What do I hold, to be matched against queries? ``(D,)``"""
        return self.w_key @ self.data

    def value(self) -> Tensor:
        """What do I send to a node that listens to me? ``(C,)``"""
        return self.w_value @ self.data


def make_nodes(
    x: Tensor, w_query: Tensor, w_key: Tensor, w_value: Tensor
) -> list[Node]:
    """One :class:`Node` per row of ``x`` ``(N, C)``, all sharing the same three maps.

    Sharing the maps is what a transformer does: the same weights serve every position,
    which is why attention handles sequences of any length.
    """
    _check_maps(x, w_query, w_key, w_value)
    return [Node(row, w_query, w_key, w_value) for row in x]


def _check_maps(x: Tensor, w_query: Tensor, w_key: Tensor, w_value: Tensor) -> None:
    if x.dim() != 2 or x.size(0) == 0:
        raise ValueError(f"x has shape {tuple(x.shape)}: expected (N, C) with at least one node")
    C = x.size(1)
    if w_query.dim() != 2 or w_query.shape != w_key.shape or w_query.size(1) != C:
        raise ValueError(
            f"w_query {tuple(w_query.shape)} and w_key {tuple(w_key.shape)} must both be (D, C) "
            f"with C={C}, the size of each node's vector"
        )
    if w_value.shape != (C, C):
        raise ValueError(f"w_value has shape {tuple(w_value.shape)}, expected (C, C) = {(C, C)}")


def random_edges(n_nodes: int, n_edges: int, generator: torch.Generator | None = None) -> list[Edge]:
    """``n_edges`` distinct directed edges ``(src, dst)`` drawn at random, self-loops allowed.

    Edges are drawn without repeats: a repeated edge would count a neighbour twice in the
    loop but once in the adjacency matrix.

    >>> random_edges(3, 9) == [(s, d) for s in range(3) for d in range(3)]  # all 9, sorted
    True
    """
    if not isinstance(n_nodes, int) or n_nodes < 1:
        raise ValueError(f"n_nodes={n_nodes!r} must be an int >= 1")
    if not isinstance(n_edges, int) or not 0 <= n_edges <= n_nodes * n_nodes:
        raise ValueError(f"n_edges={n_edges!r} must be an int between 0 and n_nodes**2 = {n_nodes ** 2}")
    picks = torch.randperm(n_nodes * n_nodes, generator=generator)[:n_edges].sort().values
    return [(int(p) // n_nodes, int(p) % n_nodes) for p in picks]


def _check_edges(n_nodes: int, edges: Sequence[Edge]) -> None:
    for edge in edges:
        if len(edge) != 2 or not all(0 <= int(v) < n_nodes for v in edge):
            raise ValueError(f"edge {edge!r} is not a pair (src, dst) of node ids in 0..{n_nodes - 1}")
    if len(set(map(tuple, edges))) != len(edges):
        raise ValueError("edges has repeats: each (src, dst) may appear once")


def adjacency_mask(n_nodes: int, edges: Sequence[Edge]) -> Tensor:
    """The boolean ``(N, N)`` mask with ``mask[dst, src] = True`` for every edge.

    Row ``i`` lists who node ``i`` listens to, the layout of an attention matrix.

    >>> adjacency_mask(3, [(0, 1), (2, 1)]).int()
    tensor([[0, 0, 0],
            [1, 0, 1],
            [0, 0, 0]], dtype=torch.int32)
    """
    _check_edges(n_nodes, edges)
    mask = torch.zeros(n_nodes, n_nodes, dtype=torch.bool)
    for src, dst in edges:
        mask[dst, src] = True
    return mask


def edges_of(mask: Tensor) -> list[Edge]:
    """The edges ``(src, dst)`` of a mask, the inverse of :func:`adjacency_mask`.

    >>> edges_of(causal_mask(2))
    [(0, 0), (0, 1), (1, 1)]
    """
    dst, src = torch.nonzero(mask, as_tuple=True)
    return sorted(zip(src.tolist(), dst.tolist()))


def complete_mask(n: int) -> Tensor:
    """Every node reads every node: an encoder's self-attention. ``(n, n)``, all True."""
    return torch.ones(n, n, dtype=torch.bool)


def causal_mask(n: int) -> Tensor:
    """Node ``i`` reads nodes ``0..i``: a decoder's self-attention. ``(n, n)``, lower-triangular.

    >>> causal_mask(3).int()
    tensor([[1, 0, 0],
            [1, 1, 0],
            [1, 1, 1]], dtype=torch.int32)
    """
    return torch.ones(n, n, dtype=torch.bool).tril()


def bipartite_mask(n_receivers: int, n_senders: int) -> Tensor:
    """Each of ``n_receivers`` nodes (decoder) reads all ``n_senders`` nodes (encoder).

    Cross-attention: queries from one set, keys and values from the other; no edges within
    a set. ``(n_receivers, n_senders)``, all True.
    """
    return torch.ones(n_receivers, n_senders, dtype=torch.bool)


def _softmax(scores: Tensor) -> Tensor:
    """Softmax of a 1-D tensor, shifted by its maximum so that exp cannot overflow."""
    e = torch.exp(scores - scores.max())
    return e / e.sum()


def message_passing_round(nodes: Sequence[Node], edges: Sequence[Edge], scale: bool = True) -> list[Tensor]:
    """One synchronous round of messages; returns every node's new vector ``(C,)``.

    For each node: gather the nodes with an edge into it, score each by
    ``key · query`` (divided by ``sqrt(D)`` when ``scale``), softmax the scores, and add
    the weighted sum of their values to the node's vector (the residual). All updates are
    computed from the old vectors before any is applied. A node without in-neighbours
    gets a zero update. The nodes themselves are not changed.
    """
    if not nodes:
        raise ValueError("nodes is empty: give at least one node")
    _check_edges(len(nodes), edges)
    new_data = []
    for i, node in enumerate(nodes):
        q = node.query()  # (D,)
        senders = [nodes[src] for src, dst in edges if dst == i]
        if not senders:
            new_data.append(node.data.clone())  # nothing arrives: keep the vector
            continue
        scores = torch.stack([m.key() @ q for m in senders])  # (n_in,)
        if scale:
            scores = scores / math.sqrt(q.numel())
        weights = _softmax(scores)
        update = sum(w * m.value() for w, m in zip(weights, senders))  # (C,)
        new_data.append(node.data + update)
    return new_data


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: bool = True) -> Tensor:
    """``softmax(q k^T / sqrt(D))`` over the entries the mask allows, times ``v``.

    ``q`` is ``(..., N, D)``, ``k`` ``(..., S, D)``, ``v`` ``(..., S, C)`` and ``mask``
    ``(N, S)`` boolean (True: may attend). Returns ``(..., N, C)``. A row with nothing
    allowed has all weights zero, so its output is zero (a plain softmax would give NaN).

    >>> q = k = v = torch.eye(2)
    >>> masked_attention(q, k, v, torch.tensor([[True, False], [False, False]]), scale=False)
    tensor([[1., 0.],
            [0., 0.]])
    """
    if q.size(-1) != k.size(-1) or k.size(-2) != v.size(-2):
        raise ValueError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} do not fit: "
            "expected (N, D), (S, D) and (S, C)"
        )
    if mask.dtype != torch.bool or mask.shape != (q.size(-2), k.size(-2)):
        raise ValueError(
            f"mask must be a boolean (N, S) = {(q.size(-2), k.size(-2))} tensor, "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )
    scores = q @ k.transpose(-2, -1)  # (..., N, S)
    if scale:
        scores = scores / math.sqrt(q.size(-1))
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    weights = torch.where(mask.any(dim=-1, keepdim=True), weights, 0.0)  # empty rows: 0, not NaN
    return weights @ v


def attention_round(
    x: Tensor, mask: Tensor, w_query: Tensor, w_key: Tensor, w_value: Tensor, scale: bool = True
) -> Tensor:
    """The round of :func:`message_passing_round` as one masked attention; returns ``(N, C)``.

    ``x`` ``(N, C)`` holds every node's vector as a row and ``mask`` ``(N, N)`` the graph.
    The weight matrices act on column vectors, as in :class:`Node`, so row vectors are
    multiplied by their transposes.
    """
    _check_maps(x, w_query, w_key, w_value)
    q, k, v = x @ w_query.T, x @ w_key.T, x @ w_value.T  # (N, D), (N, D), (N, C)
    return x + masked_attention(q, k, v, mask, scale)


class Block(nn.Module):
    """Communication then computation, each with a residual: the transformer block.

    ``x = x + attention(norm(x), mask)``: nodes exchange messages along the mask's edges
    (single-head attention with an output projection). ``x = x + mlp(norm(x))``: each
    node thinks on its own (a two-layer MLP applied to every node separately, with no
    mixing between nodes). ``x`` is ``(N, C)`` or ``(B, N, C)``; ``mask`` ``(N, N)``.
    """

    def __init__(self, n_embd: int, hidden: int | None = None) -> None:
        super().__init__()
        if not isinstance(n_embd, int) or n_embd < 1:
            raise ValueError(f"n_embd={n_embd!r} must be a positive int")
        hidden = 4 * n_embd if hidden is None else hidden
        self.n_embd = n_embd
        self.ln_1 = nn.LayerNorm(n_embd)
        self.query = nn.Linear(n_embd, n_embd, bias=False)
        self.key = nn.Linear(n_embd, n_embd, bias=False)
        self.value = nn.Linear(n_embd, n_embd, bias=False)
        self.proj = nn.Linear(n_embd, n_embd)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, hidden), nn.GELU(), nn.Linear(hidden, n_embd))

    def communicate(self, x: Tensor, mask: Tensor) -> Tensor:
        """Masked single-head self-attention with output projection; ``(..., N, C)``."""
        return self.proj(masked_attention(self.query(x), self.key(x), self.value(x), mask))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        if x.dim() not in (2, 3) or x.size(-1) != self.n_embd:
            raise ValueError(f"x has shape {tuple(x.shape)}: expected (N, C) or (B, N, C) with C={self.n_embd}")
        x = x + self.communicate(self.ln_1(x), mask)  # communication: between nodes
        x = x + self.mlp(self.ln_2(x))  # computation: inside each node
        return x


def draw_graph(
    ax,
    mask: Tensor,
    receivers: Sequence[str] | None = None,
    senders: Sequence[str] | None = None,
    title: str = "",
) -> int:
    """Draw the graph of ``mask`` ``(N, S)`` on the matplotlib axes ``ax``; returns the edge count.

    Self-attention (``senders`` None): the ``N`` nodes sit on one row; an edge to a later
    node arcs above the row, an edge to an earlier node below it, a self-loop is a small
    ring. Cross-attention (``senders`` given): senders on a bottom row, receivers on a top
    row, straight arrows up.
    """
    from matplotlib.patches import Circle, FancyArrowPatch

    n, s = mask.shape
    two_rows = senders is not None
    receivers = list(receivers) if receivers is not None else [str(i) for i in range(n)]
    senders = list(senders) if two_rows else receivers
    if len(receivers) != n or len(senders) != s:
        raise ValueError(f"{len(receivers)} receiver and {len(senders)} sender names for a mask of shape {(n, s)}")
    at_receiver = [(i, 1.0 if two_rows else 0.0) for i in range(n)]
    at_sender = [(j + (n - s) / 2, 0.0) for j in range(s)] if two_rows else at_receiver
    edges = torch.nonzero(mask).tolist()  # (receiver i, sender j) pairs
    for i, j in edges:
        if not two_rows and i == j:
            x, y = at_receiver[i]
            ax.add_patch(Circle((x, y + 0.31), 0.14, fill=False, lw=0.8, color="tab:blue"))
            continue
        bend = 0.0 if two_rows else -0.5  # bends left of travel: rightwards above, leftwards below
        ax.add_patch(FancyArrowPatch(at_sender[j], at_receiver[i], arrowstyle="-|>", lw=0.8,
                                     mutation_scale=9, color="tab:blue", shrinkA=12, shrinkB=12,
                                     connectionstyle=f"arc3,rad={bend}"))
    rows = [(receivers, at_receiver, "tab:orange")]
    if two_rows:
        rows.append((senders, at_sender, "tab:green"))
    for names, places, color in rows:
        for name, (x, y) in zip(names, places):
            # a rounded box that grows with its label, so that every name fits inside its node
            ax.text(x, y, name, ha="center", va="center", fontsize=9, zorder=4,
                    bbox=dict(boxstyle="round,pad=0.3", fc=color, ec="none"))
    ax.set_xlim(-0.7, max(n, s) - 0.3)
    ax.set_ylim(-0.6, 1.5) if two_rows else ax.set_ylim(-1.3, 1.3)
    ax.axis("off")
    ax.set_title(title, fontsize=10)
    return len(edges)


def draw_mask(
    ax, mask: Tensor, receivers: Sequence[str] | None = None, senders: Sequence[str] | None = None, title: str = ""
) -> None:
    """Draw ``mask`` ``(N, S)`` as a grid on ``ax``: a filled cell where receiver ``i`` reads sender ``j``.

    Rows are receivers (queries), columns senders (keys), as in an attention matrix.
    """
    n, s = mask.shape
    receivers = list(receivers) if receivers is not None else [str(i) for i in range(n)]
    senders = list(senders) if senders is not None else receivers
    ax.pcolormesh(mask.float().numpy(), cmap="Blues", vmin=0.0, vmax=1.3, edgecolors="white", linewidth=1)
    ax.set_xticks([j + 0.5 for j in range(s)], senders, fontsize=7)
    ax.set_yticks([i + 0.5 for i in range(n)], receivers, fontsize=7)
    ax.invert_yaxis()
    ax.set_aspect("equal")
    ax.set_xlabel("sender (key)", fontsize=8)
    ax.set_ylabel("receiver (query)", fontsize=8)
    ax.set_title(title, fontsize=10)
