"""Distributed training throughput on CPU: images/s of the quickstart model trained by 1 process and by
2 processes (`kpnet train --nproc-per-node 2`, gloo), one thread each, and the scaling ratio.

Both runs train the same global batch (default 32: 2 × 16 in the distributed run) for the same number of
iterations; images/s = iterations × batch / the training loop's own seconds (start-up and data-set
loading excluded, the first batch included). Run: `python benchmarks/distributed.py [--iterations N]
[--batch B] [--data DIR]`. On a machine with fewer than 2 free cores the ratio says so.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from kpnet.data.shapes import make_shapes

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "quickstart.yaml"


def images_per_second(data: Path, out: Path, iterations: int, batch: int, nproc: int) -> float:
    sets = [f"data.root={data}", "data.num_workers=0", f"train.batch_size={batch}", f"train.max_iterations={iterations}",
            "train.checkpoint_every=100000", "train.log_every=100000"]
    cmd = [sys.executable, "-m", "kpnet", "train", str(QUICKSTART), "--out", str(out), "--json"]
    for s in sets:
        cmd += ["--set", s]
    if nproc > 1:
        cmd += ["--nproc-per-node", str(nproc)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    doc = json.loads(proc.stdout)
    return (doc["iterations"] - doc["start_iteration"]) * batch / doc["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32, help="global batch (even)")
    parser.add_argument("--data", type=Path, default=None, help="a shapes set (default: 256 generated train images)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            data = Path(tmp) / "shapes"
            make_shapes(data, num_train=256, num_val=8, image_size=128, seed=0)
        one = images_per_second(data, Path(tmp) / "one", args.iterations, args.batch, 1)
        two = images_per_second(data, Path(tmp) / "two", args.iterations, args.batch, 2)
    print(f"quickstart, global batch {args.batch}, {args.iterations} iterations, 1 thread per process, {os.cpu_count()} CPUs")
    print(f"1 process:   {one:7.1f} images/s")
    print(f"2 processes: {two:7.1f} images/s (gloo, {args.batch // 2} images per rank)")
    print(f"scaling: {two / one:.2f}x (ideal 2.00x)")


if __name__ == "__main__":
    main()
