import pytest
import torch

from companion import device as dev
from companion import pick_device, seed_everything


@pytest.mark.parametrize(
    "capability, arch_list, ok",
    [
        ((8, 0), ["sm_75", "sm_80", "sm_90"], True),
        ((9, 0), ["sm_80", "sm_90"], True),
        ((6, 0), ["sm_75", "sm_80", "sm_90"], False),  # Kaggle's P100 with a recent build
        ((8, 9), ["sm_80", "compute_80"], True),  # newer GPU through PTX
        ((7, 0), ["sm_80", "compute_80"], False),  # PTX only runs on newer GPUs
        ((7, 5), [], False),  # a CPU-only build
    ],
)
def test_cuda_arch_supported(capability, arch_list, ok):
    got, why = dev.cuda_arch_supported(capability, arch_list)
    assert got is ok
    assert f"sm_{capability[0]}{capability[1]}" in why


def test_unsupported_gpu_falls_back_to_cpu_with_reason(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Tesla P100-PCIE-16GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (6, 0))
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_75", "sm_80", "sm_90"])
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert pick_device() == torch.device("cpu")
    out = capsys.readouterr().out
    assert "Tesla P100" in out and "sm_60" in out and "CPU" in out


def test_supported_gpu_is_picked(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA T4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_75", "sm_80"])
    assert pick_device() == torch.device("cuda")


def test_mps_is_second_choice(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert pick_device() == torch.device("mps")
    assert pick_device("cpu") == torch.device("cpu")


def test_cpu_when_nothing_else(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert pick_device() == torch.device("cpu")
    assert pick_device("cuda") == torch.device("cpu")
    assert "not available" in capsys.readouterr().out


def test_environment_variable_forces_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("COMPANION_DEVICE", "cpu")
    assert pick_device() == torch.device("cpu")


def test_bad_device_name():
    with pytest.raises(ValueError, match="prefer='tpu'"):
        pick_device("tpu")


def test_seed_everything_repeats_all_generators():
    import random

    import numpy as np

    seed_everything(7)
    a = (random.random(), np.random.rand(), torch.rand(3))
    seed_everything(7)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])
    seed_everything(8)
    assert not torch.equal(torch.rand(3), a[2])


def test_seed_must_be_non_negative_int():
    with pytest.raises(ValueError, match="seed=-1"):
        seed_everything(-1)
    with pytest.raises(ValueError, match="seed=1.5"):
        seed_everything(1.5)


# ---- how to compute on each reader's device ---------------------------------------------

def cuda(name, capability):
    return dev.DeviceInfo("cuda", name, capability, has_cxx_compiler=True)


@pytest.mark.parametrize(
    "info, dtype, scaler, compiled, attention",
    [
        (cuda("NVIDIA H100 80GB HBM3", (9, 0)), torch.bfloat16, False, True, "flash"),
        (cuda("NVIDIA A100-SXM4-40GB", (8, 0)), torch.bfloat16, False, True, "flash"),
        (cuda("Tesla T4", (7, 5)), torch.float16, True, True, "efficient"),
        (cuda("Tesla V100-SXM2-16GB", (7, 0)), torch.float16, True, True, "efficient"),
        (cuda("Tesla P100-PCIE-16GB", (6, 0)), torch.float16, True, False, "efficient"),
        (dev.DeviceInfo("mps", "Apple arm64 (MPS)", None, True), None, False, False, "math"),
        (dev.DeviceInfo("cpu", "x86_64", None, True), None, False, True, "flash"),
        (dev.DeviceInfo("cpu", "x86_64", None, False), None, False, False, "flash"),
    ],
    ids=["H100", "A100", "T4", "V100", "P100", "MPS", "CPU+g++", "CPU-no-compiler"],
)
def test_choose_plan_follows_the_rules(info, dtype, scaler, compiled, attention):
    plan = dev.choose_plan(info)
    assert plan.device == torch.device(info.type)
    assert plan.autocast_dtype is dtype
    assert plan.grad_scaler is scaler
    assert plan.compile is compiled
    assert plan.attention == attention


def test_ampere_and_hopper_need_no_fallback():
    for capability in [(8, 0), (8, 6), (9, 0)]:
        assert dev.choose_plan(cuda("GPU", capability)).reasons == ()


def test_t4_reasons_name_the_gpu_and_the_bfloat16_rule():
    reasons = dev.choose_plan(cuda("Tesla T4", (7, 5))).reasons
    assert reasons[0] == ("float16 autocast with a gradient scaler: Tesla T4 (compute capability 7.5) "
                          "has no native bfloat16 (it needs 8.0)")
    assert any("FlashAttention" in r and "Tesla T4" in r for r in reasons)
    assert not any("eager" in r or "Triton" in r for r in reasons)  # a T4 compiles


def test_p100_runs_eagerly_and_says_why():
    reasons = dev.choose_plan(cuda("Tesla P100-PCIE-16GB", (6, 0))).reasons
    assert ("Inductor's Triton kernels need compute capability 7.0; Tesla P100-PCIE-16GB has 6.0: "
            "running eagerly") in reasons
    assert any("no native bfloat16" in r and "6.0" in r for r in reasons)


def test_gpus_older_than_maxwell_get_the_math_attention():
    assert dev.choose_plan(cuda("Tesla K80", (3, 7))).attention == "math"
    assert dev.choose_plan(cuda("Tesla M60", (5, 2))).attention == "efficient"


def test_mps_reasons_say_why_float32_and_eager():
    reasons = dev.choose_plan(dev.DeviceInfo("mps", "Apple arm64 (MPS)", None, True)).reasons
    assert len(reasons) == 2
    assert reasons[0].startswith("float32 on Apple arm64 (MPS)") and "autocast" in reasons[0]
    assert reasons[1].startswith("eager on Apple arm64 (MPS)") and "Metal" in reasons[1]


def test_cpu_without_a_compiler_names_the_missing_compiler():
    without = dev.choose_plan(dev.DeviceInfo("cpu", "x86_64", None, False))
    assert len(without.reasons) == 1 and "g++" in without.reasons[0] and "eager" in without.reasons[0]
    assert dev.choose_plan(dev.DeviceInfo("cpu", "x86_64", None, True)).reasons == ()


def test_cpu_without_a_vector_isa_runs_eagerly_and_says_why():
    plan = dev.choose_plan(dev.DeviceInfo("cpu", "x86_64", None, True, cpu_vector_isa=False))
    assert plan.compile is False
    assert len(plan.reasons) == 1 and "own vector instructions" in plan.reasons[0]
    assert "ATEN_CPU_CAPABILITY" in plan.reasons[0]


def _in_a_process(code, capability):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    if capability:
        env["ATEN_CPU_CAPABILITY"] = capability
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.parametrize("capability", ["default", "avx2", None])
def test_kernels_forced_below_the_cpu_turn_compilation_off(capability):
    """Inductor's code does not build with ATEN_CPU_CAPABILITY=default, and computes wrong
    one-row products with a capability below the CPU's own (torch 2.13): the plan compiles
    only with the machine's own kernels."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("ATEN_CPU_CAPABILITY names x86 instruction sets")
    best = _in_a_process("from torch._inductor.cpu_vec_isa import valid_vec_isa_list as v; "
                         "print(str((v() or ['none'])[0]).split()[0])", None)
    plan = "from companion.device import plan_device; print(plan_device('cpu', verbose=False).compile)"
    compiles = capability is None or capability == best
    has_compiler = dev._cxx_compiler() is not None
    assert _in_a_process(plan, capability) == str(compiles and has_compiler), (capability, best)


def test_the_plan_keeps_the_cuda_index():
    info = dev.DeviceInfo("cuda", "Tesla T4", (7, 5), True, index=1)
    assert dev.choose_plan(info).device == torch.device("cuda", 1)


def test_bad_device_descriptions_are_named():
    with pytest.raises(ValueError, match="type='tpu'"):
        dev.DeviceInfo("tpu", "TPU v4", None, False)
    with pytest.raises(ValueError, match=r"capability=\(7,\)"):
        dev.DeviceInfo("cuda", "Tesla T4", (7,), True)
    with pytest.raises(ValueError, match=r"capability=\(7, 5\) must be None for a cpu"):
        dev.DeviceInfo("cpu", "x86_64", (7, 5), True)
    with pytest.raises(ValueError, match="device='meta'"):
        dev.describe_device(torch.device("meta"))


def test_bad_plans_are_refused():
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="grad_scaler=True"):
        dev.DevicePlan(cpu, torch.bfloat16, True, False, "flash")
    with pytest.raises(ValueError, match="attention='xformers'"):
        dev.DevicePlan(cpu, None, False, False, "xformers")
    with pytest.raises(ValueError, match="autocast_dtype=torch.float64"):
        dev.DevicePlan(cpu, torch.float64, False, False, "math")


def test_summary_is_one_line_with_the_choices():
    t4 = dev.choose_plan(cuda("Tesla T4", (7, 5))).summary()
    assert t4 == "cuda: float16 autocast with a gradient scaler, torch.compile, efficient attention"
    p100 = dev.choose_plan(cuda("Tesla P100-PCIE-16GB", (6, 0))).summary()
    assert "eager" in p100 and "\n" not in p100


def test_autocast_and_scaler_follow_the_plan():
    fp32 = dev.DevicePlan(torch.device("cpu"), None, False, False, "flash")
    bf16 = dev.DevicePlan(torch.device("cpu"), torch.bfloat16, False, False, "flash")
    fp16 = dev.DevicePlan(torch.device("cpu"), torch.float16, True, False, "flash")
    x = torch.randn(2, 3)
    layer = torch.nn.Linear(3, 4)
    for plan, dtype in [(fp32, torch.float32), (bf16, torch.bfloat16), (fp16, torch.float16)]:
        with plan.autocast():
            assert layer(x).dtype == dtype
    assert not fp32.scaler().is_enabled() and not bf16.scaler().is_enabled()
    assert fp16.scaler().is_enabled()


def test_describe_device_reads_this_cpu(monkeypatch):
    info = dev.describe_device(torch.device("cpu"))
    assert info.type == "cpu" and info.capability is None and info.name
    monkeypatch.setattr(dev.shutil, "which", lambda name: None)  # a machine without any compiler
    assert dev.describe_device("cpu").has_cxx_compiler is False
    monkeypatch.setattr(dev.shutil, "which", lambda name: f"/usr/bin/{name}")  # whichever Inductor asks for
    assert dev.describe_device("cpu").has_cxx_compiler is True


def test_describe_device_reads_a_simulated_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: f"Tesla T4 #{i}")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (7, 5))
    info = dev.describe_device("cuda:1")
    assert (info.type, info.name, info.capability, info.index) == ("cuda", "Tesla T4 #1", (7, 5), 1)


def test_plan_device_prints_each_reason_on_its_own_line(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Tesla P100-PCIE-16GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (6, 0))
    plan = dev.plan_device("cuda:0")
    assert capsys.readouterr().out.splitlines() == list(plan.reasons) and len(plan.reasons) == 3
    dev.plan_device("cuda:0", verbose=False)
    assert capsys.readouterr().out == ""


def test_plan_device_defaults_to_the_picked_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    plan = dev.plan_device(verbose=False)
    assert plan.device == torch.device("cpu") and plan.autocast_dtype is None
