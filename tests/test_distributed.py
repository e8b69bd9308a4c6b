"""companion.train under torchrun: two CPU processes (gloo) take the steps of one process that
sees the whole global batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _ddp_worker import build_trainer

WORKER = Path(__file__).with_name("_ddp_worker.py")


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "rank0.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKER), str(out), "4"]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return torch.load(out, weights_only=True)


def test_two_processes_train_like_one_with_the_global_batch(two_processes):
    assert two_processes["world_size"] == 2
    whole = build_trainer(8)  # one process, batch 2 x 4
    history = whole.run()
    for name, weight in whole.model.state_dict().items():
        assert torch.allclose(two_processes["state"][name], weight, atol=1e-5), name
    assert two_processes["val"] == pytest.approx(history.eval_val_loss, abs=1e-5)
    assert two_processes["tokens"] == history.tokens == 4 * 8 * 16


def test_each_process_trains_on_its_own_rows(two_processes):
    alone = build_trainer(4)  # one process with only rank 0's rows: a different run
    alone.run()
    assert not all(torch.allclose(two_processes["state"][name], weight, atol=1e-5)
                   for name, weight in alone.model.state_dict().items())
