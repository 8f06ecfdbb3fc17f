"""`kpnet info`: which backend each op uses on this machine, and why (kpnet/cuda/dispatch.py)."""

from __future__ import annotations

import typing
from typing import Any

import torch
import typer
from rich.table import Table

from kpnet import __version__
from kpnet.cli.common import DebugOpt, JsonOpt, Output, run
from kpnet.config import Backbone, TestConfig
from kpnet.cuda import dispatch, emulator
from kpnet.engine import accelerate, host_memory
from kpnet.errors import KpnetError

OPS = ("corner_pool", "line_max", "heatmap_peaks", "group_corners", "soft_nms", "soft_nms_merge")


def _body(out: Output) -> dict[str, Any]:
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        try:
            choice = dispatch.choose(device)
            backend, reason = choice.backend, choice.reason
        except KpnetError as e:  # the backend KPNET_KERNELS asks for cannot run here: ops would stop with this line
            backend, reason = "unavailable", e.line()
        rows += [{"op": op, "device": device.type, "backend": backend, "reason": reason} for op in OPS]
    cupy_ok, cupy_why = dispatch.cupy_status()
    emu_ok, emu_why = dispatch.emulator_status()
    table = Table(title=f"kpnet {__version__} kernels ({dispatch.KERNELS_ENV}={dispatch.mode()})")
    for col in ("op", "device", "backend", "reason"):
        table.add_column(col)
    for row in rows:
        table.add_row(row["op"], row["device"], row["backend"], row["reason"])
    out.print(table)
    out.print(f"CuPy: {cupy_why}")
    out.print(f"emulator: {emu_why}; cache {emulator.cache_dir()}")
    out.print("float16/bfloat16 pooling and float32 decoding have kernels; other dtypes use the PyTorch reference.")
    memory = host_memory.policy()
    out.print(f"host memory: {memory.reason}")
    cpu = torch.device("cpu")
    engine = {backbone: accelerate.plan(TestConfig(), cpu, backbone) for backbone in typing.get_args(Backbone)}
    bf16 = [b for b, p in engine.items() if p.precision == "bf16"]
    kind = "native bf16 (AVX512-BF16/AMX)" if accelerate.native_bf16_cpu() else "no native bf16"
    out.print(f"inference engine on this CPU ({kind}; test.precision / test.compile auto): bf16 for "
              f"{', '.join(bf16) or 'no backbone'}, fp32 for the others; torch.compile off")
    return {
        "kernels_env": dispatch.mode(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cupy": {"usable": cupy_ok, "reason": cupy_why},
        "emulator": {"usable": emu_ok, "reason": emu_why, "cache_dir": str(emulator.cache_dir())},
        "host_memory": {"reuse_freed": memory.reuse, "reason": memory.reason},
        "inference_engine_cpu": {b: {"precision": p.precision, "compile": p.compile, "reason": p.reason}
                                 for b, p in engine.items()},
        "ops": rows,
    }


def register(app: typer.Typer) -> None:
    @app.command("info")
    def info(json_out: JsonOpt = False, debug: DebugOpt = False) -> None:
        """Show which backend (CuPy kernels, g++ emulator, PyTorch reference) each op uses, and why."""
        run(json_out, debug, _body)
