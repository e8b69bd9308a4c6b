"""The chapter-5 language model on our engine against the same model in PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from companion.autodiff import no_grad
from companion.char_tokenizer import CharTokenizer
from companion.autodiff.lm import (
    TinyLM,
    TinyLMConfig,
    estimate_loss,
    generate,
    get_batch,
    split_data,
    to_torch,
    train,
    unigram_loss,
)
from companion.autodiff.optim import AdamW

TINY = TinyLMConfig(vocab_size=13, block_size=8, n_embd=16, n_head=4, n_layer=2, dtype="float64")




def test_same_weights_give_the_same_logits_loss_and_gradients_as_torch():
    model = TinyLM(TINY, seed=1)
    t_model = to_torch(model)
    rng = np.random.default_rng(0)
    x, y = get_batch(rng.integers(0, TINY.vocab_size, 200), 3, TINY.block_size, rng)
    logits, loss = model(x, y)
    t_logits, t_loss = t_model(torch.from_numpy(x), torch.from_numpy(y))
    np.testing.assert_allclose(logits.data, t_logits.detach().numpy(), rtol=1e-12, atol=1e-12)
    loss.backward()
    t_loss.backward()
    t_params = dict(t_model.named_parameters())
    linear = {n for n, p in model.named_parameters() if n.endswith("weight") and
              not n.startswith(("tok_emb", "pos_emb")) and p.ndim == 2}
    for name, p in model.named_parameters():
        expected = t_params[name].grad.numpy()
        expected = expected.T if name in linear else expected
        np.testing.assert_allclose(p.grad, expected, rtol=1e-9, atol=1e-12, err_msg=name)


def test_same_batches_follow_the_same_loss_curve_as_torch():
    """Twenty AdamW steps on identical batches: losses equal to float64 round-off."""
    model = TinyLM(TINY, seed=0)
    t_model = to_torch(model)
    opt = AdamW(model.parameters(), lr=3e-3)
    t_opt = torch.optim.AdamW(t_model.parameters(), lr=3e-3)
    rng = np.random.default_rng(1)
    data = np.tile(np.arange(TINY.vocab_size), 80)  # a pattern to learn
    ours, theirs = [], []
    for _ in range(20):
        x, y = get_batch(data, 4, TINY.block_size, rng)
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        _, t_loss = t_model(torch.from_numpy(x), torch.from_numpy(y))
        t_opt.zero_grad()
        t_loss.backward()
        t_opt.step()
        ours.append(loss.item())
        theirs.append(t_loss.item())
    np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=0)
    assert ours[-1] < ours[0]  # and it is learning something


def test_attention_is_causal():
    """Changing a later token never changes the logits of earlier positions."""
    model = TinyLM(TINY, seed=0)
    rng = np.random.default_rng(0)
    x = rng.integers(0, TINY.vocab_size, (2, TINY.block_size))
    x2 = x.copy()
    x2[:, 5] = (x2[:, 5] + 1) % TINY.vocab_size
    with no_grad():
        a, b = model(x)[0].data, model(x2)[0].data
    np.testing.assert_allclose(a[:, :5], b[:, :5], rtol=0, atol=1e-14)
    assert not np.allclose(a[:, 5:], b[:, 5:])


def test_float32_model_runs_in_float32():
    cfg = TinyLMConfig(vocab_size=13, block_size=8, n_embd=16, n_head=2, n_layer=1)
    model = TinyLM(cfg)
    x = np.zeros((2, 8), dtype=np.int64)
    logits, loss = model(x, x)
    loss.backward()
    assert logits.dtype == np.float32 and all(p.grad.dtype == np.float32 for p in model.parameters())


def test_dropout_is_used_in_training_only():
    cfg = TinyLMConfig(vocab_size=13, block_size=8, n_embd=16, n_head=2, n_layer=1, dropout=0.5)
    model = TinyLM(cfg)
    x = np.zeros((2, 8), dtype=np.int64)
    assert not np.array_equal(model(x)[0].data, model(x)[0].data)
    model.eval()
    np.testing.assert_array_equal(model(x)[0].data, model(x)[0].data)


def test_training_on_a_repeating_text_beats_the_unigram_baseline():
    text = "abcdefgh" * 200
    tok = CharTokenizer.from_text(text)
    train_ids, val_ids = split_data(np.array(tok.encode(text)))
    cfg = TinyLMConfig(vocab_size=tok.vocab_size, block_size=8, n_embd=16, n_head=2, n_layer=1)
    model = TinyLM(cfg, seed=0)
    history = train(model, AdamW(model.parameters(), lr=1e-2), train_ids, val_ids, steps=60,
                    batch_size=8, eval_every=30, eval_batches=2, progress=False)
    assert history["eval_step"] == [30, 60] and len(history["train"]) == 60
    assert history["val"][-1] < 0.2 < unigram_loss(train_ids, val_ids, tok.vocab_size)
    out = generate(model, np.array([tok.encode("abc")]), 10, temperature=0)
    assert tok.decode(out[0]) == "abc" + "defghabcde"


def test_generate_is_repeatable_and_crops_the_context():
    model = TinyLM(TINY, seed=0)
    start = np.zeros((2, 1), dtype=np.int64)
    a = generate(model, start, 20, rng=np.random.default_rng(5))
    b = generate(model, start, 20, rng=np.random.default_rng(5))
    assert a.shape == (2, 21) and np.array_equal(a, b)
    assert a.min() >= 0 and a.max() < TINY.vocab_size
    assert model.training  # the mode is restored


def test_get_batch_targets_are_inputs_shifted_by_one():
    data = np.arange(100)
    x, y = get_batch(data, 5, 7, np.random.default_rng(0))
    assert x.shape == y.shape == (5, 7)
    np.testing.assert_array_equal(y, x + 1)
    with pytest.raises(ValueError, match="fewer than block_size"):
        get_batch(np.arange(5), 1, 5, np.random.default_rng(0))


def test_unigram_loss_is_the_cross_entropy_of_frequencies():
    train_ids, val_ids = np.array([0, 0, 0, 1]), np.array([0, 1])
    p = np.array([4, 2]) / 6  # add-one smoothed counts
    assert unigram_loss(train_ids, val_ids, 2) == pytest.approx(-(np.log(p[0]) + np.log(p[1])) / 2)


def test_estimate_loss_builds_no_graph_and_is_repeatable():
    model = TinyLM(TINY, seed=0)
    data = np.random.default_rng(0).integers(0, TINY.vocab_size, 500)
    a = estimate_loss(model, data, batch_size=4, n_batches=3)
    assert a == estimate_loss(model, data, batch_size=4, n_batches=3)
    assert all(p.grad is None for p in model.parameters())


def test_bad_configurations_and_inputs_raise():
    with pytest.raises(ValueError, match="n_embd=10 is not divisible by n_head=3"):
        TinyLMConfig(n_embd=10, n_head=3)
    with pytest.raises(ValueError, match="dtype"):
        TinyLMConfig(dtype="float16")
    model = TinyLM(TINY)
    with pytest.raises(ValueError, match="longer than block_size=8"):
        model(np.zeros((1, 9), dtype=np.int64))
    with pytest.raises(ValueError, match=r"shape \(B, T\)"):
        model(np.zeros(4, dtype=np.int64))
