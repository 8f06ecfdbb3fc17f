"""The CPU emulator: kpnet's .cu sources compiled by g++ through kpnet_shim.h, with one generated
launcher per kernel that walks every block and thread (docs/architecture.md, "Kernels: one source,
three ways to run").

The shared library is cached by a hash of the sources, the generated launchers, the compiler
version, the flags and the CPU (the library is built for the host's vector extensions with
-march=native), in $KPNET_CACHE_DIR, else $XDG_CACHE_HOME/kpnet, else ~/.cache/kpnet. It is
compiled in a temporary directory and renamed into place, so concurrent builds never see a partial
file. Flags: -O3 without fast-math and with -ffp-contract=off, so float arithmetic rounds exactly as
on the GPU (compiled with --fmad=false) and in PyTorch; -fno-trapping-math only declares that no
floating-point exception flag is read (values are unchanged), which lets g++ turn the kernels'
compare-and-select into vector blends instead of branches.

Loading a library also tells it the host's last-level cache size (host_cache_bytes): pooling calls whose
tensors exceed it stream their outputs past the caches (kpnet_cpu_lanes.h, streams()).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

from kpnet.errors import KpnetError

SOURCE_DIR = Path(__file__).resolve().parent
CXX_FLAGS = ("-std=c++17", "-O3", "-march=native", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math",
             "-fno-trapping-math")


def compiler() -> str | None:
    """The C++ compiler the emulator uses: $CXX if set and found, else g++ on PATH, else None."""
    return _find_compiler(os.environ.get("CXX"), os.environ.get("PATH"))


@lru_cache(maxsize=8)
def _find_compiler(cxx: str | None, path: str | None) -> str | None:
    """compiler() for given $CXX and $PATH, looked up once: searching PATH took about 60 µs, on every op call
    that chooses its backend (a quarter of the copy floor of a (1,128,128,128) float32 tensor)."""
    for name in (cxx, "g++"):
        found = shutil.which(name, path=path) if name else None
        if found:
            return found
    return None


@lru_cache(maxsize=8)
def probe(cxx: str | None) -> tuple[bool, str]:
    """Whether `cxx` compiles the shim and the CPU lanes header (GCC >= 12 or Clang: vector shuffles), with the
    reason in one line when it does not; checked once per process and compiler."""
    if cxx is None:
        return False, "no C++ compiler found (looked for $CXX, g++)"
    unit = '#include "kpnet_shim.h"\n#include "kpnet_types.cuh"\n#include "kpnet_cpu_lanes.h"\n'
    try:
        proc = subprocess.run([cxx, *CXX_FLAGS, "-fsyntax-only", "-I", str(SOURCE_DIR), "-x", "c++", "-"], input=unit,
                              capture_output=True, text=True, check=False, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"C++ compiler {cxx} did not run ({type(e).__name__}: {e})"
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if "error" in line] or proc.stderr.splitlines() or ["?"]
        return False, f"C++ compiler {cxx} cannot build the emulator (GCC >= 12 or Clang needed): {errors[0].strip()}"
    return True, f"C++ compiler {cxx}"


def cache_dir() -> Path:
    """Where built emulator libraries live (see the module docstring)."""
    if os.environ.get("KPNET_CACHE_DIR"):
        return Path(os.environ["KPNET_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kpnet"


def _launcher(name: str, params: tuple[str, ...]) -> str:
    """C++ for `kpnet_emu_<name>(dims, args)`: set the launch shape, call the kernel for every thread."""
    call = ", ".join(f"*({p}*)args[{i}]" for i, p in enumerate(params))
    return (
        f'extern "C" void kpnet_emu_{name}(const unsigned int* d, void** args) {{\n'
        "    gridDim = dim3{d[0], d[1], d[2]}; blockDim = dim3{d[3], d[4], d[5]};\n"
        "    for (unsigned int bz = 0; bz < d[2]; ++bz) for (unsigned int by = 0; by < d[1]; ++by)\n"
        "    for (unsigned int bx = 0; bx < d[0]; ++bx) {\n"
        "        blockIdx = dim3{bx, by, bz};\n"
        "        for (unsigned int tz = 0; tz < d[5]; ++tz) for (unsigned int ty = 0; ty < d[4]; ++ty)\n"
        "        for (unsigned int tx = 0; tx < d[3]; ++tx) {\n"
        "            threadIdx = dim3{tx, ty, tz};\n"
        f"            {name}({call});\n"
        "        }\n"
        "    }\n"
        "}\n"
    )


def translation_unit(kernels: dict[str, tuple[str, tuple[str, ...]]]) -> str:
    """One C++ file: the shim, every .cu source, and a launcher per kernel in `kernels` (name -> (file, params))."""
    files = sorted({src for src, _ in kernels.values()})
    parts = ['#include "kpnet_shim.h"'] + [f'#include "{f}"' for f in files]
    parts += [_launcher(name, params) for name, (_, params) in sorted(kernels.items())]
    return "\n".join(parts) + "\n"


def _compiler_version(cxx: str) -> str:
    return subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False).stdout


def _host_cpu() -> str:
    """What -march=native builds for: the machine and, on Linux, the CPU model and feature flags."""
    text = platform.machine()
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return text + platform.processor()
    keep = [line for line in info.splitlines() if line.startswith(("model name", "flags", "Features"))]
    return "\n".join([text, *sorted(set(keep))])


def build(kernels: dict[str, tuple[str, tuple[str, ...]]]) -> Path:
    """Compile (or find in the cache) the emulator library for `kernels`; returns its path."""
    cxx = compiler()
    if cxx is None:
        raise KpnetError("emulator", "no C++ compiler found (set $CXX or install g++)")
    unit = translation_unit(kernels)
    digest = hashlib.sha256()
    for part in (unit, _compiler_version(cxx), " ".join(CXX_FLAGS), _host_cpu()):
        digest.update(part.encode())
    for f in sorted(SOURCE_DIR.glob("*.cu")) + sorted(SOURCE_DIR.glob("*.cuh")) + sorted(SOURCE_DIR.glob("*.h")):
        digest.update(f.name.encode() + f.read_bytes())
    target = cache_dir() / f"kpnet_emulator_{digest.hexdigest()[:24]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        src = Path(tmp) / "kpnet_emulator.cpp"
        src.write_text(unit)
        lib = Path(tmp) / target.name
        proc = subprocess.run([cxx, *CXX_FLAGS, "-I", str(SOURCE_DIR), str(src), "-o", str(lib)],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise KpnetError("emulator", f"{cxx} failed to compile the kernels:\n{proc.stderr.strip()}")
        os.replace(lib, target)
    return target


@lru_cache(maxsize=4)
def host_cache_bytes(root: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int:
    """The size in bytes of CPU 0's last-level cache as Linux reports it (sysfs, under root), or 0 where unknown."""
    sizes = []
    for index in root.glob("index*"):
        try:
            level = int((index / "level").read_text())
            size = (index / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(size[-1:], 1)
        digits = size.rstrip("KMG")
        if digits.isdigit():
            sizes.append((level, int(digits) * scale))
    return max(sizes)[1] if sizes else 0


def set_host_cache_bytes(lib: ctypes.CDLL, size: int) -> None:
    """Tell a loaded library the last-level cache size its stores plan for (0: never stream)."""
    lib.kpnet_emu_set_host_cache_bytes(ctypes.c_longlong(size))


@lru_cache(maxsize=None)
def _library(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)
    set_host_cache_bytes(lib, host_cache_bytes())
    return lib


def load(kernels: dict[str, tuple[str, tuple[str, ...]]]) -> ctypes.CDLL:
    """The emulator library for `kernels`, built (or found in the cache) and loaded."""
    return _library(str(build(kernels)))


def run(lib: ctypes.CDLL, name: str, grid: tuple[int, int, int], block: tuple[int, int, int],
        args: list[ctypes._SimpleCData]) -> None:
    """Launch kernel `name` of `lib` (from `load`) on the CPU: every block and thread of grid × block, in order."""
    dims = (ctypes.c_uint * 6)(*grid, *block)
    argv = (ctypes.c_void_p * len(args))(*[ctypes.addressof(a) for a in args])
    getattr(lib, f"kpnet_emu_{name}")(dims, argv)
