"""Hand-written RNN, LSTM and GRU against torch.nn, the gradient-norm measurement, seq2seq."""

import pytest
import torch
from torch import nn

from companion.rnn import (
    BOS,
    EOS,
    VOCAB_SIZE,
    GRUCell,
    LSTMCell,
    RecurrentLayer,
    RNNCell,
    Seq2Seq,
    copy_weights_from_torch,
    exact_match_accuracy,
    from_torch,
    reverse_digits_batch,
    run_sequence,
    state_jacobian_norms,
    train_seq2seq,
)





TORCH = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
TORCH_CELLS = {"rnn": (nn.RNNCell, RNNCell), "lstm": (nn.LSTMCell, LSTMCell), "gru": (nn.GRUCell, GRUCell)}


def assert_close(a, b):
    torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("mode", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("bias", [True, False])
def test_cells_equal_torch_cells(mode, bias):
    torch.manual_seed(0)
    theirs_cls, ours_cls = TORCH_CELLS[mode]
    theirs = theirs_cls(3, 5, bias=bias).double()
    ours = ours_cls(3, 5, bias=bias).double()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            p.copy_(getattr(theirs, name))
    x = torch.randn(4, 3, dtype=torch.float64)
    h = torch.randn(4, 5, dtype=torch.float64)
    if mode == "lstm":
        c = torch.randn(4, 5, dtype=torch.float64)
        for a, b in zip(ours(x, (h, c)), theirs(x, (h, c))):
            assert_close(a, b)
    else:
        assert_close(ours(x, h), theirs(x, h))
        assert_close(ours(x), theirs(x))  # state defaults to zeros


@pytest.mark.parametrize("mode", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_layers_equal_torch(mode, batch_first, num_layers):
    torch.manual_seed(1)
    theirs = TORCH[mode](4, 6, num_layers=num_layers, batch_first=batch_first).double()
    ours = from_torch(theirs)
    assert ours.batch_first == batch_first
    B, T = 3, 7
    x = torch.randn((B, T, 4) if batch_first else (T, B, 4), dtype=torch.float64)
    h0 = torch.randn(num_layers, B, 6, dtype=torch.float64)
    state = (h0, torch.randn_like(h0)) if mode == "lstm" else h0
    for s in (None, state):
        out_ours, final_ours = ours(x, s)
        out_theirs, final_theirs = theirs(x, s)
        assert out_ours.shape == ((B, T, 6) if batch_first else (T, B, 6))
        assert_close(out_ours, out_theirs)
        if mode == "lstm":
            assert_close(final_ours[0], final_theirs[0])
            assert_close(final_ours[1], final_theirs[1])
        else:
            assert_close(final_ours, final_theirs)


def test_relu_rnn_and_unbatched_input_equal_torch():
    torch.manual_seed(2)
    theirs = nn.RNN(3, 4, nonlinearity="relu").double()
    ours = from_torch(theirs)
    x = torch.randn(5, 3, dtype=torch.float64)  # (T, I), no batch
    out, h = ours(x)
    out_t, h_t = theirs(x)
    assert out.shape == (5, 4) and h.shape == (1, 4)
    assert_close(out, out_t)
    assert_close(h, h_t)


def test_gradients_equal_torch():
    torch.manual_seed(3)
    theirs = nn.LSTM(3, 4, batch_first=True).double()
    ours = from_torch(theirs)
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    ours(x)[0].sum().backward()
    theirs(x)[0].sum().backward()
    for name, p in ours.cells[0].named_parameters():
        assert_close(p.grad, getattr(theirs, f"{name}_l0").grad)


def test_run_sequence_matches_layer_and_stacks_hidden_states():
    torch.manual_seed(4)
    cell = GRUCell(2, 3)
    x = torch.randn(5, 1, 2)
    out, h = run_sequence(cell, x)
    assert out.shape == (5, 1, 3)
    assert torch.equal(out[-1], h)
    h1 = cell(x[0])
    assert torch.equal(out[0], h1)


def test_copy_weights_rejects_mismatches():
    with pytest.raises(ValueError, match="hidden_size"):
        copy_weights_from_torch(RecurrentLayer("gru", 3, 5), nn.GRU(3, 4))
    with pytest.raises(ValueError, match="differ"):
        copy_weights_from_torch(RecurrentLayer("gru", 3, 4), nn.LSTM(3, 4))
    with pytest.raises(ValueError, match="bidirectional"):
        copy_weights_from_torch(RecurrentLayer("gru", 3, 4), nn.GRU(3, 4, bidirectional=True))
    with pytest.raises(ValueError, match="nonlinearity"):
        copy_weights_from_torch(RecurrentLayer("rnn", 3, 4), nn.RNN(3, 4, nonlinearity="relu"))
    with pytest.raises(ValueError, match="expected torch.nn.RNN"):
        from_torch(nn.Linear(3, 4))


def test_clear_errors_for_bad_input():
    cell = RNNCell(3, 4)
    with pytest.raises(ValueError, match="input_size=3"):
        cell(torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"state has shape \(2, 5\)"):
        cell(torch.zeros(2, 3), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="empty sequence"):
        run_sequence(cell, torch.zeros(0, 2, 3))
    layer = RecurrentLayer("lstm", 3, 4, num_layers=2)
    with pytest.raises(ValueError, match="input_size=3"):
        layer(torch.zeros(5, 2, 7))
    with pytest.raises(ValueError, match="empty sequence"):
        layer(torch.zeros(0, 2, 3))
    with pytest.raises(ValueError, match="pair"):
        layer(torch.zeros(5, 2, 3), torch.zeros(2, 2, 4))
    with pytest.raises(ValueError, match=r"\(num_layers, B, H\)"):
        layer(torch.zeros(5, 2, 3), (torch.zeros(1, 2, 4), torch.zeros(1, 2, 4)))
    with pytest.raises(ValueError, match="mode"):
        RecurrentLayer("transformer", 3, 4)
    with pytest.raises(ValueError, match="hidden_size=0"):
        GRUCell(3, 0)


@pytest.mark.parametrize("mode", ["rnn", "lstm", "gru"])
def test_state_jacobian_norms_equal_autograd_through_torch(mode):
    torch.manual_seed(5)
    theirs = TORCH[mode](3, 4).double()
    cell = TORCH_CELLS[mode][1](3, 4).double()
    with torch.no_grad():
        for name, p in cell.named_parameters():
            p.copy_(getattr(theirs, f"{name}_l0"))
    x = torch.randn(6, 3, dtype=torch.float64)
    h0 = torch.randn(4, dtype=torch.float64)

    def hidden_states(h):
        state = (h[None], torch.zeros(1, 4, dtype=torch.float64)) if mode == "lstm" else h[None]
        return theirs(x, state)[0]  # (T, H)

    jac = torch.autograd.functional.jacobian(hidden_states, h0)  # (T, H, H)
    expected = torch.linalg.matrix_norm(jac, ord=2)
    assert_close(state_jacobian_norms(cell, x, h0), expected)


def test_small_recurrent_weights_make_gradients_vanish_large_ones_explode():
    torch.manual_seed(6)
    cell = RNNCell(2, 16).double()
    x = torch.zeros(30, 2, dtype=torch.float64)  # zero input: the state stays at 0, tanh stays linear
    with torch.no_grad():
        q, _ = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))
        for scale, check in ((0.5, lambda n: n[-1] < 1e-8), (1.5, lambda n: n[-1] > 1e4)):
            cell.weight_hh.copy_(scale * q)  # orthogonal times scale: every singular value = scale
            cell.bias_ih.zero_()
            cell.bias_hh.zero_()
            norms = state_jacobian_norms(cell, x)
            assert_close(norms, scale ** torch.arange(1, 31, dtype=torch.float64))
            assert check(norms)


def test_reverse_digits_batch():
    g = torch.Generator().manual_seed(0)
    src, tgt = reverse_digits_batch(8, 5, g)
    assert src.shape == tgt.shape == (8, 5)
    assert torch.equal(tgt, src.flip(1))
    assert int(src.max()) < 10 and int(src.min()) >= 0
    with pytest.raises(ValueError, match="length=0"):
        reverse_digits_batch(8, 0)


@pytest.mark.parametrize("attention", [False, True])
def test_seq2seq_shapes_and_teacher_forcing_loss_falls(attention):
    torch.manual_seed(7)
    model = Seq2Seq(hidden_size=32, embed_size=8, attention=attention)
    src, tgt = reverse_digits_batch(4, 3)
    dec_in = torch.cat([torch.full((4, 1), BOS), tgt], dim=1)
    assert model(src, dec_in).shape == (4, 4, VOCAB_SIZE)
    losses = train_seq2seq(model, [2, 3], steps=150, generator=torch.Generator().manual_seed(0))
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    out = model.greedy(src, steps=4)
    assert out.shape == (4, 4)
    acc = exact_match_accuracy(model, 2, n=50, generator=torch.Generator().manual_seed(1))
    assert 0.0 <= acc <= 1.0


def test_greedy_decoding_feeds_back_its_own_tokens():
    """Greedy decoding step by step equals the teacher-forced pass fed its own outputs."""
    torch.manual_seed(8)
    model = Seq2Seq(hidden_size=16, embed_size=8, attention=True).eval()
    src, _ = reverse_digits_batch(3, 4)
    out = model.greedy(src, steps=5)
    dec_in = torch.cat([torch.full((3, 1), BOS), out[:, :-1]], dim=1)
    with torch.no_grad():
        assert torch.equal(model(src, dec_in).argmax(-1), out)


def test_the_two_seq2seq_models_differ_only_in_what_the_decoder_reads():
    torch.manual_seed(9)
    plain, attending = Seq2Seq(16, 8, attention=False), Seq2Seq(16, 8, attention=True)
    assert [p.shape for p in plain.parameters()] == [p.shape for p in attending.parameters()]
    attending.load_state_dict(plain.state_dict())
    src, tgt = reverse_digits_batch(3, 5)
    memory, h = plain.encode(src)
    assert memory.shape == (3, 1, 16) and torch.equal(memory[:, 0], h[0])  # the final state only
    _, _, weights = plain.decode(memory, tgt, h)
    assert torch.equal(weights, torch.ones(3, 5, 1))
    memory, h2 = attending.encode(src)
    assert memory.shape == (3, 5, 16) and torch.equal(h, h2)  # all states, same final state
    _, _, weights = attending.decode(memory, tgt, h2)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 5))
    assert not torch.allclose(plain(src, tgt), attending(src, tgt))  # same weights, other memory


def test_seq2seq_errors():
    model = Seq2Seq(hidden_size=8, embed_size=4)
    with pytest.raises(ValueError, match="S >= 1"):
        model(torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="lengths is empty"):
        train_seq2seq(model, [], steps=1)
    assert EOS == VOCAB_SIZE - 1
