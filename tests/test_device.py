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
