"""Recurrent networks by hand: RNN, LSTM and GRU cells, layers over time, seq2seq.

A *cell* computes one time step: it reads the input ``x_t`` and the previous state and
returns the next state. A *layer* runs a cell over a whole sequence. The cells use
PyTorch's parameter names and gate order, so weights copy one to one from
``torch.nn.RNN``, ``torch.nn.LSTM`` and ``torch.nn.GRU`` (see :func:`from_torch`), and the
outputs then agree to float64 precision (tested).

With ``W_ih`` of shape ``(gates * H, I)`` and ``W_hh`` of shape ``(gates * H, H)``:

* RNN, one gate:  ``h' = tanh(W_ih x + b_ih + W_hh h + b_hh)``
* LSTM, gates ``i, f, g, o``:  ``c' = σ(f) * c + σ(i) * tanh(g)``,  ``h' = σ(o) * tanh(c')``
* GRU, gates ``r, z, n``:  ``n = tanh(W_in x + b_in + σ(r) * (W_hn h + b_hn))``,
  ``h' = (1 - σ(z)) * n + σ(z) * h``

The module also holds what the chapter measures with these cells: the norm of
``d h_t / d h_0`` (vanishing and exploding gradients, :func:`state_jacobian_norms`) and a
small encoder-decoder that reverses digit strings, with and without attention
(:class:`Seq2Seq`), to show the fixed-size bottleneck.
"""

from __future__ import annotations

import math
from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "BOS",
    "CELLS",
    "EOS",
    "VOCAB_SIZE",
    "GRUCell",
    "LSTMCell",
    "RNNCell",
    "RecurrentLayer",
    "Seq2Seq",
    "copy_weights_from_torch",
    "exact_match_accuracy",
    "from_torch",
    "reverse_digits_batch",
    "run_sequence",
    "state_jacobian_norms",
    "train_seq2seq",
]

State = Union[Tensor, tuple[Tensor, Tensor]]


# ---- cells ---------------------------------------------------------------------------------


def _positive_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive int")
    return value


class _Cell(nn.Module):
    """Parameters and input checks shared by the three cells (not used on its own)."""

    n_gates = 1

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True) -> None:
        super().__init__()
        self.input_size = _positive_int("input_size", input_size)
        self.hidden_size = _positive_int("hidden_size", hidden_size)
        rows = self.n_gates * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(rows, input_size))
        self.weight_hh = nn.Parameter(torch.empty(rows, hidden_size))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(rows))
            self.bias_hh = nn.Parameter(torch.empty(rows))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        # PyTorch's initialisation: every parameter uniform in (-1/sqrt(H), 1/sqrt(H)).
        bound = 1.0 / math.sqrt(hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def _check(self, x: Tensor, h: Tensor | None) -> Tensor:
        """Check ``x`` ``(..., I)`` and ``h`` ``(..., H)``; return ``h`` (zeros when None)."""
        if x.dim() == 0 or x.size(-1) != self.input_size:
            raise ValueError(
                f"x has shape {tuple(x.shape)}: its last dimension must be "
                f"input_size={self.input_size}"
            )
        if h is None:
            return x.new_zeros(*x.shape[:-1], self.hidden_size)
        if h.shape != (*x.shape[:-1], self.hidden_size):
            raise ValueError(
                f"state has shape {tuple(h.shape)}, expected {(*x.shape[:-1], self.hidden_size)} "
                f"for x of shape {tuple(x.shape)} and hidden_size={self.hidden_size}"
            )
        return h

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, bias={self.bias_ih is not None}"


class RNNCell(_Cell):
    """The Elman RNN step: ``h' = tanh(W_ih x + b_ih + W_hh h + b_hh)``.

    ``x`` is ``(B, I)`` (or ``(I,)``), ``h`` is ``(B, H)`` (zeros when None); returns ``h'``
    ``(B, H)``. ``nonlinearity="relu"`` swaps tanh for ReLU, as ``torch.nn.RNN`` allows.

    >>> cell = RNNCell(3, 5)
    >>> cell(torch.zeros(2, 3)).shape
    torch.Size([2, 5])
    """

    n_gates = 1

    def __init__(
        self, input_size: int, hidden_size: int, bias: bool = True, nonlinearity: str = "tanh"
    ) -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity={nonlinearity!r} must be 'tanh' or 'relu'")
        super().__init__(input_size, hidden_size, bias)
        self.nonlinearity = nonlinearity

    def forward(self, x: Tensor, h: Tensor | None = None) -> Tensor:
        h = self._check(x, h)
        pre = F.linear(x, self.weight_ih, self.bias_ih) + F.linear(h, self.weight_hh, self.bias_hh)
        return torch.tanh(pre) if self.nonlinearity == "tanh" else torch.relu(pre)


class LSTMCell(_Cell):
    """The LSTM step (Hochreiter and Schmidhuber, 1997), gates in PyTorch's order i, f, g, o.

    The state is a pair ``(h, c)``, each ``(B, H)`` (zeros when None); returns ``(h', c')``.
    The cell state ``c`` is updated additively, ``c' = σ(f) * c + σ(i) * tanh(g)``, which is
    why gradients survive many more steps than in a plain RNN.

    >>> h, c = LSTMCell(3, 5)(torch.zeros(2, 3))
    >>> h.shape, c.shape
    (torch.Size([2, 5]), torch.Size([2, 5]))
    """

    n_gates = 4

    def forward(
        self, x: Tensor, state: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        if state is not None and not (isinstance(state, tuple) and len(state) == 2):
            raise ValueError("an LSTM state is a pair (h, c) of tensors")
        h, c = (None, None) if state is None else state
        h, c = self._check(x, h), self._check(x, c)
        gates = F.linear(x, self.weight_ih, self.bias_ih) + F.linear(h, self.weight_hh, self.bias_hh)
        i, f, g, o = gates.chunk(4, dim=-1)  # each (B, H)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, c


class GRUCell(_Cell):
    """The GRU step (Cho et al., 2014), gates in PyTorch's order r, z, n.

    ``x`` is ``(B, I)``, ``h`` is ``(B, H)`` (zeros when None); returns ``h'`` ``(B, H)``.
    Note where the reset gate acts: on ``W_hn h + b_hn``, after the matrix product, which
    is PyTorch's (and cuDNN's) convention.

    >>> GRUCell(3, 5)(torch.zeros(2, 3)).shape
    torch.Size([2, 5])
    """

    n_gates = 3

    def forward(self, x: Tensor, h: Tensor | None = None) -> Tensor:
        h = self._check(x, h)
        x_r, x_z, x_n = F.linear(x, self.weight_ih, self.bias_ih).chunk(3, dim=-1)  # each (B, H)
        h_r, h_z, h_n = F.linear(h, self.weight_hh, self.bias_hh).chunk(3, dim=-1)
        r = torch.sigmoid(x_r + h_r)
        z = torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        return (1 - z) * n + z * h


CELLS: dict[str, type[_Cell]] = {"rnn": RNNCell, "lstm": LSTMCell, "gru": GRUCell}


# ---- running cells over time ---------------------------------------------------------------


def _hidden(state: State) -> Tensor:
    return state[0] if isinstance(state, tuple) else state


def run_sequence(cell: nn.Module, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
    """Run ``cell`` over the time steps of ``x`` ``(T, B, I)``, time first.

    Returns ``(outputs, final_state)``: ``outputs`` ``(T, B, H)`` stacks the hidden state
    after every step; ``final_state`` is the last state (``(h, c)`` for an LSTM).

    >>> out, h = run_sequence(RNNCell(3, 4), torch.zeros(6, 2, 3))
    >>> out.shape, h.shape
    (torch.Size([6, 2, 4]), torch.Size([2, 4]))
    """
    if x.dim() < 2:
        raise ValueError(f"x has shape {tuple(x.shape)}: expected (T, B, I) or (T, I)")
    if x.size(0) == 0:
        raise ValueError("x is an empty sequence (T = 0): give at least one time step")
    outputs = []
    for x_t in x:  # the loop over time that attention will later remove
        state = cell(x_t, state)
        outputs.append(_hidden(state))
    return torch.stack(outputs), state


class RecurrentLayer(nn.Module):
    """A stack of RNN, LSTM or GRU cells run over a sequence, like ``torch.nn.RNN/LSTM/GRU``.

    ``mode`` is ``"rnn"``, ``"lstm"`` or ``"gru"``. Inputs and states have PyTorch's
    shapes: ``x`` is ``(T, B, I)``, or ``(B, T, I)`` with ``batch_first=True``, or ``(T, I)``
    unbatched; the state is ``h0`` ``(num_layers, B, H)`` (``(h0, c0)`` for an LSTM), zeros
    when None. Returns ``(output, final_state)`` with ``output`` the top layer's hidden
    states ``(T, B, H)`` (or ``(B, T, H)``) and ``final_state`` shaped like the state.
    One direction only; layer ``l + 1`` reads layer ``l``'s outputs.

    >>> layer = RecurrentLayer("gru", 3, 4, num_layers=2, batch_first=True)
    >>> out, h = layer(torch.zeros(5, 7, 3))
    >>> out.shape, h.shape
    (torch.Size([5, 7, 4]), torch.Size([2, 5, 4]))
    """

    def __init__(
        self,
        mode: str,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        nonlinearity: str = "tanh",
    ) -> None:
        super().__init__()
        if mode not in CELLS:
            raise ValueError(f"mode={mode!r} must be one of {sorted(CELLS)}")
        _positive_int("num_layers", num_layers)
        if mode != "rnn" and nonlinearity != "tanh":
            raise ValueError(f"nonlinearity={nonlinearity!r} only applies to mode='rnn'")
        self.mode, self.batch_first = mode, batch_first
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        extra = {"nonlinearity": nonlinearity} if mode == "rnn" else {}
        self.cells = nn.ModuleList(
            CELLS[mode](input_size if layer == 0 else hidden_size, hidden_size, bias, **extra)
            for layer in range(num_layers)
        )

    def _layer_states(self, state: State | None, batch_shape: tuple[int, ...]) -> list:
        """Split a PyTorch-shaped state ``(L, B, H)`` into one state per layer."""
        if state is None:
            return [None] * self.num_layers
        parts = state if self.mode == "lstm" else (state,)
        if self.mode == "lstm" and not (isinstance(state, tuple) and len(state) == 2):
            raise ValueError("an LSTM state is a pair (h0, c0) of tensors")
        expected = (self.num_layers, *batch_shape, self.hidden_size)
        for p in parts:
            if tuple(p.shape) != expected:
                raise ValueError(
                    f"state has shape {tuple(p.shape)}, expected (num_layers, B, H) = {expected}"
                )
        if self.mode == "lstm":
            return [(state[0][l], state[1][l]) for l in range(self.num_layers)]
        return [state[l] for l in range(self.num_layers)]

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        if x.dim() not in (2, 3):
            raise ValueError(
                f"x has shape {tuple(x.shape)}: expected (T, B, I), (B, T, I) with "
                "batch_first=True, or (T, I) unbatched"
            )
        if x.size(-1) != self.input_size:
            raise ValueError(
                f"x has {x.size(-1)} features per step, but the layer expects "
                f"input_size={self.input_size}"
            )
        if self.batch_first and x.dim() == 3:
            x = x.transpose(0, 1)  # (T, B, I)
        states = self._layer_states(state, tuple(x.shape[1:-1]))
        finals = []
        for cell, layer_state in zip(self.cells, states):
            x, final = run_sequence(cell, x, layer_state)  # x becomes (T, B, H)
            finals.append(final)
        if self.batch_first and x.dim() == 3:
            x = x.transpose(0, 1)  # (B, T, H)
        if self.mode == "lstm":
            return x, (torch.stack([h for h, _ in finals]), torch.stack([c for _, c in finals]))
        return x, torch.stack(finals)


_TORCH_MODES = {nn.RNN: "rnn", nn.LSTM: "lstm", nn.GRU: "gru"}


def copy_weights_from_torch(layer: RecurrentLayer, module: nn.Module) -> RecurrentLayer:
    """Copy the weights of ``torch.nn.RNN/LSTM/GRU`` ``module`` into ``layer``; returns ``layer``.

    Both must have the same kind, sizes, number of layers and bias setting. PyTorch names
    layer ``l``'s weights ``weight_ih_l{l}`` and so on; our cells use the same names
    without the suffix, and the same gate order, so the copy is one to one.
    """
    mode = _TORCH_MODES.get(type(module))
    if mode is None:
        raise ValueError(f"expected torch.nn.RNN, LSTM or GRU, got {type(module).__name__}")
    if module.bidirectional or getattr(module, "proj_size", 0):
        raise ValueError("bidirectional layers and LSTM projections (proj_size) are not supported")
    ours = (layer.mode, layer.input_size, layer.hidden_size, layer.num_layers, layer.cells[0].bias_ih is not None)
    theirs = (mode, module.input_size, module.hidden_size, module.num_layers, module.bias)
    if ours != theirs:
        raise ValueError(
            f"(mode, input_size, hidden_size, num_layers, bias) differ: ours {ours}, "
            f"torch's {theirs}"
        )
    if mode == "rnn" and layer.cells[0].nonlinearity != module.nonlinearity:
        raise ValueError(
            f"nonlinearity differs: ours {layer.cells[0].nonlinearity!r}, "
            f"torch's {module.nonlinearity!r}"
        )
    with torch.no_grad():
        for l, cell in enumerate(layer.cells):
            for name, p in cell.named_parameters():
                p.copy_(getattr(module, f"{name}_l{l}"))
    return layer


def from_torch(module: nn.Module) -> RecurrentLayer:
    """A :class:`RecurrentLayer` configured like ``module`` and holding a copy of its weights.

    >>> torch_gru = torch.nn.GRU(3, 4, batch_first=True)
    >>> ours = from_torch(torch_gru)
    >>> x = torch.randn(2, 5, 3)
    >>> torch.allclose(ours(x)[0], torch_gru(x)[0], atol=1e-6)
    True
    """
    mode = _TORCH_MODES.get(type(module))
    if mode is None:
        raise ValueError(f"expected torch.nn.RNN, LSTM or GRU, got {type(module).__name__}")
    extra = {"nonlinearity": module.nonlinearity} if mode == "rnn" else {}
    layer = RecurrentLayer(
        mode, module.input_size, module.hidden_size, module.num_layers,
        bias=module.bias, batch_first=module.batch_first, **extra,
    )
    layer = layer.to(dtype=module.weight_ih_l0.dtype, device=module.weight_ih_l0.device)
    return copy_weights_from_torch(layer, module)


# ---- vanishing and exploding gradients ---------------------------------------------------------


def state_jacobian_norms(cell: nn.Module, x: Tensor, h0: Tensor | None = None) -> Tensor:
    """The spectral norm of ``d h_t / d h_0`` for ``t = 1..T``; returns ``(T,)``.

    ``x`` is one sequence ``(T, I)`` and ``h0`` the initial hidden state ``(H,)`` (zeros when
    None; an LSTM's initial cell state is zeros and held fixed). The Jacobian
    ``d h_t / d h_0`` is the product of the ``t`` one-step Jacobians, so its norm says how
    much a small change in the first state can still move the state ``t`` steps later;
    by the chain rule it is also what scales the gradient that a loss at step ``t`` sends
    back to step 0.

    The Jacobians come from ordinary backpropagation, one backward pass per step: the
    sequence runs as a batch of ``H`` identical copies, so that the gradient of the sum of
    ``h_t[k, k]`` over ``k`` holds, in row ``k``, the gradient of unit ``k`` of ``h_t`` with
    respect to copy ``k``'s ``h_0``: row ``k`` of ``d h_t / d h_0``.
    """
    if x.dim() != 2:
        raise ValueError(f"x has shape {tuple(x.shape)}: expected one sequence (T, I)")
    if x.size(0) == 0:
        raise ValueError("x is an empty sequence (T = 0): give at least one time step")
    H = cell.hidden_size
    h0 = x.new_zeros(H) if h0 is None else h0
    if h0.shape != (H,):
        raise ValueError(f"h0 has shape {tuple(h0.shape)}, expected ({H},)")
    with torch.enable_grad():
        h0_copies = h0.detach().expand(H, H).clone().requires_grad_()  # (H copies, H)
        state = (h0_copies, h0.new_zeros(H, H)) if isinstance(cell, LSTMCell) else h0_copies
        rows = []
        for x_t in x:
            state = cell(x_t.expand(H, -1), state)  # (H, H): the same step for every copy
            h_t = _hidden(state)
            rows.append(torch.autograd.grad(h_t.diagonal().sum(), h0_copies, retain_graph=True)[0])
    jac = torch.stack(rows)  # (T, H, H): d h_t / d h_0
    return torch.linalg.matrix_norm(jac, ord=2)


# ---- an encoder-decoder on a synthetic task ------------------------------------------------------

N_DIGITS = 10
BOS, EOS = 10, 11  # token ids after the ten digits
VOCAB_SIZE = 12


def reverse_digits_batch(
    batch_size: int, length: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """A batch of the reversal task: random digit strings and their reverses.

    Returns ``(source, target)``, both ``(B, T)`` token ids in ``0..9``; ``target`` is
    ``source`` read backwards. The decoder is fed ``BOS`` then ``target`` and must predict
    ``target`` then ``EOS`` (see :meth:`Seq2Seq.forward`).

    >>> src, tgt = reverse_digits_batch(1, 4, torch.Generator().manual_seed(0))
    >>> bool(torch.equal(tgt, src.flip(1)))
    True
    """
    _positive_int("batch_size", batch_size)
    _positive_int("length", length)
    source = torch.randint(0, N_DIGITS, (batch_size, length), generator=generator)
    return source, source.flip(1)


class Seq2Seq(nn.Module):
    """A GRU encoder-decoder whose decoder reads either the final encoder state or all of them.

    The encoder is a bidirectional GRU with ``hidden_size // 2`` units per direction, as in
    Bahdanau et al. (2015): encoder state ``e_j`` ``(H,)`` joins what the forward GRU read up
    to token ``j`` and what the backward GRU read from the end back to ``j``. Its final
    state is the two directions' last states side by side. The decoder is a GRU started
    from that final state.

    At every output step the decoder reads a *memory* and predicts from its own state
    ``s_t`` and what it read. It scores each memory vector ``m_j`` by ``(W s_t) · m_j``, turns
    the scores into weights with a softmax, and takes the weighted average (the context);
    the output is ``out(tanh(combine([s_t; context])))``. The two models differ only in
    the memory, and have the same parameters (without attention ``W`` is unused):

    * ``attention=False``: the memory is one vector, the final encoder state (so its
      weight is always 1), much as in Cho et al. (2014), where the decoder sees that summary at
      every step. Every digit must squeeze through ``hidden_size`` numbers.
    * ``attention=True``: the memory is all ``S`` encoder states, and the weights are
      attention (Bahdanau et al., 2015, with the "general" score of Luong et al., 2015, who
      write it with ``W`` transposed).

    ``forward(source, decoder_input)`` takes ``(B, S)`` and ``(B, T)`` token ids and returns
    logits ``(B, T, VOCAB_SIZE)``; training feeds the true previous token (teacher forcing).
    """

    def __init__(self, hidden_size: int = 64, embed_size: int = 16, attention: bool = False) -> None:
        super().__init__()
        if not isinstance(hidden_size, int) or hidden_size < 2 or hidden_size % 2:
            raise ValueError(f"hidden_size={hidden_size!r} must be an even int >= 2 (half per direction)")
        self.attention = attention
        self.embed = nn.Embedding(VOCAB_SIZE, embed_size)
        self.encoder = nn.GRU(embed_size, hidden_size // 2, batch_first=True, bidirectional=True)
        self.decoder = nn.GRU(embed_size, hidden_size, batch_first=True)
        self.score = nn.Linear(hidden_size, hidden_size, bias=False)
        self.combine = nn.Linear(2 * hidden_size, hidden_size)
        self.out = nn.Linear(hidden_size, VOCAB_SIZE)

    def encode(self, source: Tensor) -> tuple[Tensor, Tensor]:
        """The memory the decoder reads, ``(B, S, H)`` or ``(B, 1, H)``, and the final state ``(1, B, H)``."""
        if source.dim() != 2 or source.size(1) == 0:
            raise ValueError(f"source has shape {tuple(source.shape)}: expected (B, S) with S >= 1")
        states, h = self.encoder(self.embed(source))  # states: (B, S, H); h: (2, B, H/2)
        final = torch.cat([h[0], h[1]], dim=-1)  # (B, H): both directions' last states
        memory = states if self.attention else final[:, None, :]  # (B, S, H) or (B, 1, H)
        return memory, final[None]

    def decode(self, memory: Tensor, tokens: Tensor, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Run the decoder on ``tokens`` ``(B, T)`` from state ``h`` ``(1, B, H)``.

        Returns logits ``(B, T, V)``, the new state and the weights over the memory
        ``(B, T, S)`` (``(B, T, 1)``, all ones, without attention).
        """
        s, h = self.decoder(self.embed(tokens), h)  # s: (B, T, H)
        weights = (self.score(s) @ memory.transpose(1, 2)).softmax(dim=-1)  # (B, T, S)
        context = weights @ memory  # (B, T, H)
        logits = self.out(torch.tanh(self.combine(torch.cat([s, context], dim=-1))))
        return logits, h, weights

    def forward(self, source: Tensor, decoder_input: Tensor) -> Tensor:
        memory, h = self.encode(source)
        return self.decode(memory, decoder_input, h)[0]

    @torch.no_grad()
    def greedy(self, source: Tensor, steps: int) -> Tensor:
        """Decode ``steps`` tokens greedily for each row of ``source``; returns ``(B, steps)``."""
        memory, h = self.encode(source)
        token = torch.full((source.size(0), 1), BOS, dtype=torch.long, device=source.device)
        out = []
        for _ in range(steps):
            logits, h, _ = self.decode(memory, token, h)
            token = logits.argmax(dim=-1)  # (B, 1)
            out.append(token)
        return torch.cat(out, dim=1)


def _teacher_forcing(target: Tensor) -> tuple[Tensor, Tensor]:
    """Decoder input ``[BOS, y_1..y_T]`` and labels ``[y_1..y_T, EOS]``, both ``(B, T + 1)``."""
    B = target.size(0)
    bos = torch.full((B, 1), BOS, dtype=torch.long, device=target.device)
    eos = torch.full((B, 1), EOS, dtype=torch.long, device=target.device)
    return torch.cat([bos, target], dim=1), torch.cat([target, eos], dim=1)


def train_seq2seq(
    model: Seq2Seq,
    lengths: list[int],
    steps: int,
    batch_size: int = 64,
    lr: float = 3e-3,
    generator: torch.Generator | None = None,
) -> list[float]:
    """Train ``model`` on the reversal task with teacher forcing; returns the loss per step.

    Each step draws one length from ``lengths`` and a batch of that length (one length per
    batch, so no padding is needed), feeds the true previous tokens to the decoder and
    minimises the cross-entropy of the next token. Adam, with the learning rate decaying
    linearly to 0 and gradients clipped to norm 1.
    """
    if not lengths:
        raise ValueError("lengths is empty: give at least one sequence length to train on")
    _positive_int("steps", steps)
    device = next(model.parameters()).device
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / steps)  # linear to 0
    losses = []
    model.train()
    for _ in range(steps):
        length = lengths[int(torch.randint(len(lengths), (1,), generator=generator))]
        source, target = reverse_digits_batch(batch_size, length, generator)
        source, target = source.to(device), target.to(device)
        dec_in, labels = _teacher_forcing(target)
        logits = model(source, dec_in)  # (B, T + 1, V)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), labels.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def exact_match_accuracy(
    model: Seq2Seq, length: int, n: int = 500, generator: torch.Generator | None = None
) -> float:
    """The share of ``n`` fresh strings of ``length`` digits the model reverses exactly.

    Decoding is greedy (the model's own previous token is fed back, no teacher); a string
    counts only if all ``length`` digits and the final ``EOS`` are right. The model is left
    in evaluation mode.
    """
    model.eval()
    device = next(model.parameters()).device
    source, target = reverse_digits_batch(n, length, generator)
    _, labels = _teacher_forcing(target.to(device))
    predicted = model.greedy(source.to(device), steps=length + 1)
    return (predicted == labels).all(dim=1).float().mean().item()
