"""CPU training and inference keep freed memory for reuse: a second large tensor of the same size takes
no fresh pages (glibc), unless KPNET_MALLOC=system."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the policy is glibc's mallopt")

# Steady state of a loop that allocates, fills and frees a 64 MiB tensor: minor page faults of 3 rounds.
# (Under the policy glibc first grows its heap for a few rounds: posix_memalign leaves small remainders
# beside each freed block, which other allocations take, until freed neighbours coalesce.)
PROBE = """
import json, resource, torch
from kpnet.engine import host_memory
policy = host_memory.reuse_freed_memory()
for _ in range(16):  # glibc reaches its steady state after a few rounds of heap growth
    torch.empty(2**24).fill_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    torch.empty(2**24).fill_(1.0)
print(json.dumps({"reuse": policy.reuse, "reason": policy.reason,
                  "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""
FRESH_TENSOR_FAULTS = 2**26 // 4096  # 64 MiB of fresh 4 KiB pages


def _probe(**env: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                          env={**os.environ, "KPNET_MALLOC": "", **env})
    return json.loads(proc.stdout)


def test_reuse_keeps_large_blocks_mapped():
    reused = _probe()
    assert reused["reuse"], reused
    assert reused["faults"] < FRESH_TENSOR_FAULTS // 2, reused
    default = _probe(KPNET_MALLOC="system")
    assert not default["reuse"] and "KPNET_MALLOC=system" in default["reason"]
    assert default["faults"] > 2 * FRESH_TENSOR_FAULTS, default


ENTRY = """
import json, sys
from pathlib import Path
from kpnet.config import load_recipe
from kpnet.engine import host_memory
from kpnet.engine.train import train
from kpnet.engine.inference import predict_dataset
from kpnet.api import load_checkpoint
from kpnet.data.dataset import load_index
root, out, step = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
recipe = load_recipe(Path("recipes/quickstart.yaml"), [f"data.root={root}", "data.num_workers=0",
                     "train.max_iterations=1", "model.hg_dims=[16,16,16,16,16]", "model.hg_stem=8", "model.hg_cnv=16",
                     "model.head_conv=16"])
if step == "train":
    train(recipe, out)
else:
    index = load_index(root / "annotations" / "instances_val.json", root / "val")
    predict_dataset(load_checkpoint(out / "last.pt"), index)
print(json.dumps({"applied": host_memory._applied is not None and host_memory._applied.reuse}))
"""


def test_cpu_training_and_inference_apply_the_policy(shapes_small, tmp_path):
    """A fresh process applies it when it trains or predicts on CPU; `kpnet info` reports it."""
    for step in ("train", "predict"):
        proc = subprocess.run([sys.executable, "-c", ENTRY, str(shapes_small), str(tmp_path / "run"), step],
                              capture_output=True, text=True, cwd=REPO, env={**os.environ, "KPNET_MALLOC": ""})
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout.splitlines()[-1]) == {"applied": True}, step
    proc = subprocess.run([sys.executable, "-m", "kpnet.cli", "info", "--json"], capture_output=True, text=True,
                          check=True, env={**os.environ, "KPNET_MALLOC": "system"})
    assert json.loads(proc.stdout)["host_memory"]["reuse_freed"] is False
