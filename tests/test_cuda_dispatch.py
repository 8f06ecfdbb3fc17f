"""Backend choice (KPNET_KERNELS) and the `kpnet info` subcommand that reports it."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from kpnet.cli import app
from kpnet.cuda import dispatch
from kpnet.errors import KpnetError


def test_default_cpu_runs_the_emulator_where_it_builds(monkeypatch):
    monkeypatch.delenv("KPNET_KERNELS", raising=False)
    choice = dispatch.choose(torch.device("cpu"))
    ok, why = dispatch.emulator_ready()
    assert "CPU tensor" in choice.reason and why in choice.reason
    assert choice.backend == ("emulate" if ok else "torch")


def test_default_cpu_falls_back_to_the_reference_without_a_build(monkeypatch):
    from kpnet.cuda import launch

    monkeypatch.delenv("KPNET_KERNELS", raising=False)
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.setenv("PATH", "/nonexistent")
    choice = dispatch.choose(torch.device("cpu"))
    assert choice.backend == "torch" and "no C++ compiler found" in choice.reason

    def broken() -> None:
        raise KpnetError("emulator", "g++ failed to compile the kernels:\nkernel.cu:1: error: test")

    monkeypatch.delenv("CXX")
    monkeypatch.undo()
    monkeypatch.delenv("KPNET_KERNELS", raising=False)
    if not dispatch.emulator_status()[0]:
        pytest.skip("no C++ compiler that builds the emulator here")
    monkeypatch.setattr(launch, "_emulator_library", broken)
    dispatch._built.cache_clear()
    try:
        choice = dispatch.choose(torch.device("cpu"))
        assert choice.backend == "torch" and "the emulator did not build (emulator: g++ failed" in choice.reason
    finally:
        dispatch._built.cache_clear()


def test_modes(monkeypatch):
    monkeypatch.setenv("KPNET_KERNELS", "torch")
    assert dispatch.choose(torch.device("cpu")).backend == "torch"
    monkeypatch.setenv("KPNET_KERNELS", "emulate")
    assert dispatch.choose(torch.device("cpu"), has_kernel=False).backend == "torch"
    monkeypatch.setenv("KPNET_KERNELS", "cuda")
    assert dispatch.choose(torch.device("cpu")).backend == "torch"
    monkeypatch.setenv("KPNET_KERNELS", "gpu")
    with pytest.raises(KpnetError, match="KPNET_KERNELS: unknown value 'gpu'"):
        dispatch.choose(torch.device("cpu"))


def test_cuda_tensor_without_cupy(monkeypatch):
    monkeypatch.setattr(dispatch, "cupy_status", lambda: (False, "CuPy is not importable (test)"))
    monkeypatch.delenv("KPNET_KERNELS", raising=False)
    choice = dispatch.choose(torch.device("cuda"))
    assert choice.backend == "torch" and "CuPy is not importable (test)" in choice.reason
    monkeypatch.setenv("KPNET_KERNELS", "cuda")
    with pytest.raises(KpnetError, match="cuda kernels requested but CuPy is not importable"):
        dispatch.choose(torch.device("cuda"))


def test_info_json(monkeypatch):
    monkeypatch.setenv("KPNET_KERNELS", "torch")
    result = CliRunner().invoke(app, ["info", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["kernels_env"] == "torch" and doc["checks_failed"] == []
    cpu = {r["op"]: r for r in doc["ops"] if r["device"] == "cpu"}
    assert set(cpu) == {"corner_pool", "line_max", "heatmap_peaks", "group_corners", "soft_nms", "soft_nms_merge"}
    assert all(r["backend"] == "torch" and r["reason"] == "KPNET_KERNELS=torch" for r in cpu.values())
    engine = doc["inference_engine_cpu"]
    assert engine["hourglass104"]["precision"] in ("bf16", "fp32") and engine["resnet18"]["precision"] == "fp32"
    assert not any(p["compile"] for p in engine.values())


def test_info_bad_env_exits_2(monkeypatch):
    monkeypatch.setenv("KPNET_KERNELS", "fast")
    result = CliRunner().invoke(app, ["info"])
    assert result.exit_code == 2
    assert "KPNET_KERNELS: unknown value 'fast'" in result.output


def test_emulator_check_compiles_the_lanes_header(monkeypatch, tmp_path):
    """A compiler that cannot build kpnet_cpu_lanes.h (here a stand-in for g++ 11, which lacks
    __builtin_shufflevector) makes the emulator unusable: KPNET_KERNELS=emulate refuses in one line naming why,
    the default falls back to the reference."""
    gcc11 = tmp_path / "g++"
    gcc11.write_text("#!/bin/sh\necho \"kpnet_cpu_lanes.h:44:22: error: '__builtin_shufflevector' was not declared "
                     "in this scope\" >&2\nexit 1\n")
    gcc11.chmod(0o755)
    monkeypatch.setenv("CXX", str(gcc11))
    ok, why = dispatch.emulator_status()
    assert not ok and "(GCC >= 12 or Clang needed)" in why and "__builtin_shufflevector" in why and "\n" not in why
    monkeypatch.setenv("KPNET_KERNELS", "emulate")
    with pytest.raises(KpnetError, match=r"^KPNET_KERNELS: emulate requested but C\+\+ compiler .*g\+\+ cannot build"):
        dispatch.choose(torch.device("cpu"))
    monkeypatch.setenv("KPNET_KERNELS", "auto")
    assert dispatch.choose(torch.device("cpu")).backend == "torch"

