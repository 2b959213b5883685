"""Prefix tuning through fastprefix in two processes (gloo, CPU): after the all-reduce, the prefix gradients of
`from_peft` and of a `TrainablePrefix` equal one process's on the whole batch, under DistributedDataParallel
and FSDP2 (`fully_shard`) launched by torchrun, and under `accelerate launch`; DDP refuses ranks whose prefixes
differ in length. helpers/distributed.py is the script each launcher runs."""

import os
import pathlib
import subprocess
import sys

import pytest
import torch

from fastprefix.testing import relative_error
from helpers import distributed

HELPERS = pathlib.Path(distributed.__file__).resolve()
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2"]


def launch(launcher, mode, out):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HELPERS.parent.parent), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([*launcher, str(HELPERS), mode, str(out)], capture_output=True, text=True, env=env,
                          timeout=300)


def assert_equal_to_one_process(path):
    got, want = torch.load(path), distributed.single_process_gradients()
    assert got.keys() == want.keys() == {"from_peft", "trainable"}
    for name in want:
        assert got[name].keys() == want[name].keys() and want[name]
        for parameter in want[name]:
            assert relative_error(got[name][parameter], want[name][parameter]) < 1e-5, (name, parameter)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_gradients_equal_one_process_on_the_whole_batch(mode, tmp_path):
    proc = launch(TORCHRUN, mode, tmp_path / "grads.pt")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_equal_to_one_process(tmp_path / "grads.pt")


def test_ddp_refuses_ranks_whose_prefixes_differ_in_length(tmp_path):
    proc = launch(TORCHRUN, "mismatch", tmp_path / "grads.pt")
    assert proc.returncode != 0 and not (tmp_path / "grads.pt").exists()
    assert "appears not to match sizes of the same param in process 0" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow
def test_accelerate_launch_gradients_equal_one_process(tmp_path):
    proc = launch(ACCELERATE, "accelerate", tmp_path / "grads.pt")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_equal_to_one_process(tmp_path / "grads.pt")
