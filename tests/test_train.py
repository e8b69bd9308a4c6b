"""companion.train: schedule, decay groups, clipping, evaluation, checkpoints and exact resume."""

import json
import math

import pytest
import torch
from safetensors import safe_open

from companion.gpt import GPT, GPTConfig
from companion.train import History, TrainConfig, Trainer, configure_optimizer, lm_loss, lr_at, plot_losses


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(GPTConfig.preset("tiny", vocab_size=16, n_positions=16, **overrides))


def tokens(n=4000, seed=0):
    """A learnable stream: a repeated random phrase with a little noise."""
    g = torch.Generator().manual_seed(seed)
    phrase = torch.randint(0, 16, (23,), generator=g)
    stream = phrase.repeat(n // 23 + 1)[:n]
    noise = torch.rand(n, generator=g) < 0.1
    return torch.where(noise, torch.randint(0, 16, (n,), generator=g), stream)


def small_config(**overrides):
    base = dict(max_steps=12, batch_size=4, learning_rate=3e-3, min_lr=3e-4, warmup_steps=3,
                eval_interval=4, eval_batches=2, progress=False)
    return TrainConfig(**{**base, **overrides})


# ---- learning-rate schedule ---------------------------------------------------------------


def test_warmup_is_linear_up_to_the_peak():
    lrs = [lr_at(s, 1e-3, 1e-4, warmup_steps=10, decay_steps=100) for s in range(10)]
    assert lrs == pytest.approx([1e-4 * (s + 1) for s in range(10)])


def test_cosine_part_equals_pytorchs_cosine_annealing():
    warmup, total, max_lr, min_lr = 5, 45, 0.1, 0.01
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=max_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - warmup, eta_min=min_lr)
    theirs = []
    for _ in range(total - warmup + 1):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    ours = [lr_at(s, max_lr, min_lr, warmup, total) for s in range(warmup, total + 1)]
    assert ours == pytest.approx(theirs, rel=1e-9)


def test_after_decay_the_rate_stays_at_its_floor():
    assert lr_at(100, 1.0, 0.1, 10, 100) == lr_at(10_000, 1.0, 0.1, 10, 100) == 0.1
    assert lr_at(55, 1.0, 0.0, 10, 100) == pytest.approx(0.5)  # halfway down the cosine


# ---- optimizer ------------------------------------------------------------------------------


def test_weight_decay_only_on_matrices_and_the_tied_matrix_once():
    model = tiny_model()
    opt = configure_optimizer(model, 1e-3, 0.1)
    decay, no_decay = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    decayed = {names[id(p)] for p in decay["params"]}
    assert "transformer.wte.weight" in decayed and "transformer.wpe.weight" in decayed
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_parameters()
    assert not {names[id(p)] for p in no_decay["params"]} - {
        n for n, _ in model.named_parameters() if n.endswith("bias") or ".ln_" in n}


def test_decoupled_decay_shrinks_matrices_and_leaves_gains_alone():
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = configure_optimizer(model, 0.5, 0.1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    after = dict(model.named_parameters())
    torch.testing.assert_close(after["transformer.h.0.mlp.c_fc.weight"],
                               before["transformer.h.0.mlp.c_fc.weight"] * (1 - 0.5 * 0.1))
    assert torch.equal(after["transformer.h.0.ln_1.weight"], before["transformer.h.0.ln_1.weight"])


def test_lm_loss_is_mean_cross_entropy():
    logits = torch.randn(2, 3, 5)
    targets = torch.randint(0, 5, (2, 3))
    manual = -torch.log_softmax(logits, -1).gather(-1, targets[..., None]).mean()
    torch.testing.assert_close(lm_loss(logits, targets), manual)


# ---- training -------------------------------------------------------------------------------


def test_training_lowers_the_validation_loss():
    data = tokens()
    trainer = Trainer(tiny_model(), data[:3000], data[3000:], small_config(max_steps=60, eval_interval=30))
    history = trainer.run()
    assert history.eval_steps == [30, 60]
    assert history.eval_val_loss[-1] < math.log(16) - 1.0
    assert len(history.train_loss) == len(history.lr) == 60


def test_gradients_are_clipped():
    data = tokens()
    trainer = Trainer(tiny_model(), data[:3000], data[3000:], small_config(grad_clip=1e-3))
    trainer.train_step()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainer.model.parameters()]))
    assert norm.item() == pytest.approx(1e-3, rel=1e-3)
    unclipped = Trainer(tiny_model(), data[:3000], data[3000:], small_config(grad_clip=0.0))
    unclipped.train_step()
    assert torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in unclipped.model.parameters()])) > 1e-2


def test_each_step_uses_the_scheduled_learning_rate():
    data = tokens()
    trainer = Trainer(tiny_model(), data[:3000], data[3000:], small_config())
    trainer.run()
    assert trainer.history.lr == [lr_at(s, 3e-3, 3e-4, 3, 12) for s in range(12)]
    assert trainer.optimizer.param_groups[0]["lr"] == lr_at(11, 3e-3, 3e-4, 3, 12)


def test_evaluation_is_repeatable_and_leaves_training_mode_on():
    data = tokens()
    trainer = Trainer(tiny_model(dropout=0.2), data[:3000], data[3000:], small_config())
    assert trainer.evaluate() == trainer.evaluate()
    assert trainer.model.training


def test_bf16_autocast_step_runs_on_cpu():
    data = tokens()
    trainer = Trainer(tiny_model(), data[:3000], data[3000:], small_config(dtype="bfloat16"))
    loss = trainer.train_step()
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


def test_progress_bar_writes_to_stderr_only(capsys):
    data = tokens()
    Trainer(tiny_model(), data[:3000], data[3000:], small_config(max_steps=3, progress=True)).run()
    out, err = capsys.readouterr()
    assert out == "" and "training" in err


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="dtype='fp16' must be one of 'auto', 'float32', 'bfloat16', 'float16'"):
        small_config(dtype="fp16")
    with pytest.raises(ValueError, match="min_lr"):
        small_config(min_lr=1.0)
    data = tokens()
    trainer = Trainer(tiny_model(), data[:3000], data[3000:], small_config())
    with pytest.raises(ValueError, match="until=13"):
        trainer.run(until=13)


# ---- checkpoints and exact resume -----------------------------------------------------------


def test_interrupted_and_resumed_run_ends_with_exactly_the_same_weights(tmp_path):
    data = tokens()
    train, val = data[:3000], data[3000:]
    config = small_config(max_steps=12)
    model_config = dict(dropout=0.1)  # dropout draws random numbers: their state must resume too

    straight = Trainer(tiny_model(**model_config), train, val, config)
    straight.run()

    first = Trainer(tiny_model(**model_config), train, val, config)
    first.run(until=6)
    first.save(tmp_path / "ckpt")
    torch.manual_seed(12345)  # whatever happens to the global generator in between

    resumed = Trainer(tiny_model(seed=99, **model_config), train, val, config)  # other weights
    resumed.load(tmp_path / "ckpt")
    assert resumed.step == 6 and resumed.train_batches.step == 6
    resumed.run()

    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert straight.history.train_loss == resumed.history.train_loss
    assert straight.history.eval_val_loss == resumed.history.eval_val_loss
    sa, sb = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)


def test_without_restoring_the_random_state_the_runs_differ(tmp_path):
    """The resume test above can fail: skipping one piece of state breaks it."""
    data = tokens()
    config = small_config(max_steps=8)
    straight = Trainer(tiny_model(dropout=0.1), data[:3000], data[3000:], config)
    straight.run()
    first = Trainer(tiny_model(dropout=0.1), data[:3000], data[3000:], config)
    first.run(until=4)
    first.save(tmp_path)
    resumed = Trainer(tiny_model(dropout=0.1), data[:3000], data[3000:], config)
    resumed.load(tmp_path)
    torch.manual_seed(0)  # clobber the restored dropout generator
    resumed.run()
    assert not torch.equal(straight.model.transformer.wte.weight, resumed.model.transformer.wte.weight)


def test_checkpoint_files_load_without_unpickling_code(tmp_path):
    data = tokens()
    trainer = Trainer(tiny_model(), data[:3000], data[3000:], small_config(max_steps=4, checkpoint_dir=str(tmp_path)))
    trainer.run()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "optimizer.pt", "trainer.json"]
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    weights = trainer.model.state_dict()
    assert "transformer.h.0.attn.c_attn.weight" in stored
    assert len(stored) == len(weights) - 1  # the tied matrix is stored once
    for k, v in stored.items():
        assert torch.equal(v, weights[k]), k
    rest = torch.load(tmp_path / "optimizer.pt", weights_only=True)
    assert set(rest) == {"optimizer", "rng"}
    state = json.loads((tmp_path / "trainer.json").read_text())
    assert state["step"] == 4 and state["train_batches"] == {"seed": 0, "step": 4}
    assert state["model_config"]["vocab_size"] == 16


def test_checkpoint_of_another_model_size_is_refused(tmp_path):
    data = tokens()
    trainer = Trainer(tiny_model(), data[:3000], data[3000:], small_config(max_steps=2))
    trainer.run()
    trainer.save(tmp_path)
    other = Trainer(tiny_model(n_layer=1), data[:3000], data[3000:], small_config(max_steps=2))
    with pytest.raises(ValueError, match="n_layer"):
        other.load(tmp_path)


def test_plot_losses_draws_three_curves():
    import matplotlib

    matplotlib.use("Agg")
    history = History(steps=[0, 1, 2], train_loss=[3.0, 2.0, 1.5], lr=[1e-3] * 3,
                      eval_steps=[2], eval_train_loss=[1.4], eval_val_loss=[1.6])
    ax = plot_losses(history)
    assert len(ax.get_lines()) == 3 and ax.get_xlabel() == "step"


def test_command_line_run_writes_its_result(tmp_path, capsys):
    from companion.train import main

    out = tmp_path / "result.json"
    result = main(["--preset", "shakespeare-char-cpu", "--max-steps", "2", "--eval-batches", "1",
                   "--sample-length", "5", "--no-progress", "--out", str(out)])
    written = json.loads(out.read_text())
    assert written["final_val_loss"] == result["final_val_loss"] < math.log(65) + 0.5
    assert written["model_config"]["n_layer"] == 4 and written["train_config"]["max_steps"] == 2
    assert len(written["sample"]) == 6  # the prompt "\n" and five characters
    assert "final validation loss" in capsys.readouterr().out


def test_save_best_keeps_the_checkpoint_with_the_lowest_validation_loss(tmp_path):
    # Validation text from another phrase: the more the model learns its training phrase,
    # the worse it predicts the other one, so the best checkpoint is an early one.
    config = small_config(max_steps=12, eval_interval=3, learning_rate=1e-2, checkpoint_dir=str(tmp_path), save_best=True)
    trainer = Trainer(tiny_model(), tokens()[:3000], tokens(seed=1)[:1000], config)
    history = trainer.run()
    assert history.eval_val_loss[0] < min(history.eval_val_loss[1:])
    best = json.loads((tmp_path / "best" / "trainer.json").read_text())
    assert best["step"] == 3 and best["history"]["eval_val_loss"] == history.eval_val_loss[:1]
    assert json.loads((tmp_path / "trainer.json").read_text())["step"] == 12  # the last one too
    restored = Trainer(tiny_model(seed=5), tokens()[:3000], tokens(seed=1)[:1000], config)
    restored.load(tmp_path / "best")
    assert restored.evaluate()["val"] == history.eval_val_loss[0]


# ---- float16 with a gradient scaler, and the device's plan ----------------------------------
# This torch's CPU autocast supports float16 (matmuls run in half precision) and
# torch.amp.GradScaler("cpu") works, so the float16 path is tested end to end on the CPU.


def poison_gradient(trainer, at_step):
    """Make one weight's gradient inf during the backward pass of step ``at_step``: an fp16 overflow."""
    weight = trainer.model.transformer.h[0].mlp.c_fc.weight
    return weight.register_hook(lambda g: torch.full_like(g, math.inf) if trainer.step == at_step else g)


def test_fp16_training_on_cpu_lowers_the_loss():
    data = tokens()
    config = small_config(dtype="float16", max_steps=30, eval_interval=15)
    trainer = Trainer(tiny_model(), data[:3000], data[3000:], config)
    assert trainer.scaler.is_enabled() and trainer.scaler.get_scale() == 2.0**16
    with trainer.autocast():
        assert trainer.model(data[None, :16]).dtype == torch.float16
    history = trainer.run()
    assert history.eval_val_loss[-1] < math.log(16) - 0.5
    assert history.eval_val_loss[-1] < history.eval_val_loss[0]
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # only the compute is fp16


def test_an_overflow_skips_the_step_and_backs_off_the_scale():
    data = tokens()
    trainer = Trainer(tiny_model(), data[:3000], data[3000:], small_config(dtype="float16"))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    hook = poison_gradient(trainer, at_step=0)
    trainer.train_step()
    assert trainer.scaler.get_scale() == 2.0**15  # halved (backoff_factor 0.5)
    for name, weight in trainer.model.named_parameters():  # not even weight decay moved them
        assert torch.equal(weight, before[name]), name
    hook.remove()
    trainer.train_step()
    assert trainer.scaler.get_scale() == 2.0**15  # a clean step keeps the scale (it grows after 2000)
    assert not torch.equal(trainer.model.transformer.h[0].mlp.c_fc.weight, before["transformer.h.0.mlp.c_fc.weight"])


def test_fp16_clips_the_unscaled_gradients():
    data = tokens()
    trainer = Trainer(tiny_model(), data[:3000], data[3000:], small_config(dtype="float16", grad_clip=1e-3))
    trainer.train_step()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainer.model.parameters()]))
    assert norm.item() == pytest.approx(1e-3, rel=1e-3)  # clipping the scaled ones would leave 1e-3 / 2**16


def test_float32_and_bfloat16_runs_have_no_scaler_to_skip_steps():
    data = tokens()
    for dtype in ("float32", "bfloat16"):
        trainer = Trainer(tiny_model(), data[:3000], data[3000:], small_config(dtype=dtype))
        assert not trainer.scaler.is_enabled()
        before = trainer.model.transformer.h[0].mlp.c_fc.weight.detach().clone()
        poison_gradient(trainer, at_step=0)
        trainer.train_step()  # nothing guards the step: the inf reaches the weights
        assert not torch.isfinite(trainer.model.transformer.h[0].mlp.c_fc.weight).all()
        assert not torch.equal(trainer.model.transformer.h[0].mlp.c_fc.weight, before)


def test_fp16_scaler_state_is_checkpointed_and_resumes_exactly(tmp_path):
    data = tokens()
    train, val = data[:3000], data[3000:]
    config = small_config(dtype="float16", max_steps=8)
    straight = Trainer(tiny_model(), train, val, config)
    poison_gradient(straight, at_step=1)
    straight.run()

    first = Trainer(tiny_model(), train, val, config)
    poison_gradient(first, at_step=1)
    first.run(until=4)
    first.save(tmp_path)
    rest = torch.load(tmp_path / "optimizer.pt", weights_only=True)
    assert set(rest) == {"optimizer", "rng", "scaler"} and rest["scaler"]["scale"] == 2.0**15

    resumed = Trainer(tiny_model(seed=3), train, val, config)
    assert resumed.scaler.get_scale() == 2.0**16  # a fresh scaler, before loading
    resumed.load(tmp_path)
    assert resumed.scaler.state_dict() == first.scaler.state_dict()
    resumed.run()
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert straight.scaler.state_dict() == resumed.scaler.state_dict()


def test_auto_dtype_asks_the_device_plan(monkeypatch):
    import companion.device as device_module
    from companion.device import DeviceInfo

    data = tokens()
    auto = Trainer(tiny_model(), data[:3000], data[3000:], small_config(dtype="auto"))
    assert auto.autocast_dtype is None and not auto.scaler.is_enabled()  # the real CPU: float32
    t4 = DeviceInfo("cuda", "Tesla T4", (7, 5), has_cxx_compiler=True)
    monkeypatch.setattr(device_module, "describe_device", lambda device: t4)
    as_if_t4 = Trainer(tiny_model(), data[:3000], data[3000:], small_config(dtype="auto"))
    assert as_if_t4.autocast_dtype is torch.float16 and as_if_t4.scaler.is_enabled()


def test_command_line_takes_dtype_from_the_plan_and_prints_its_reasons_once(tmp_path, capsys, monkeypatch):
    import companion.train as train_module
    from companion.device import DevicePlan

    plan = DevicePlan(torch.device("cpu"), torch.float16, True, False, "flash",
                      reasons=("first reason for the test", "second reason for the test"))
    monkeypatch.setattr(train_module, "plan_device", lambda device, verbose=True: plan)
    args = ["--max-steps", "2", "--eval-batches", "1", "--sample-length", "2", "--no-progress"]
    result = train_module.main(args)
    out = capsys.readouterr().out
    assert out.count("first reason for the test\n") == 1 and out.count("second reason for the test\n") == 1
    assert result["train_config"]["dtype"] == "float16" and result["train_config"]["compile"] is False
    assert result["plan"] == plan.summary()
    assert train_module.main([*args, "--dtype", "bfloat16"])["train_config"]["dtype"] == "bfloat16"
