"""What every subcommand shares: `--json` / `--debug` options, the output consoles, and
the one place that turns results and errors into stdout, stderr and exit codes.

Exit codes: 0 success; 1 a check the user asked for failed (e.g. `--min-ap`);
2 bad input or usage (one line naming the file and the culprit); 3 an internal error
(a bug: rerun with `--debug` for the traceback); 4 a distributed run lost one of its processes
(`kpnet.engine.distributed.PeerLost`; `--nproc-per-node` exits 128 + signal when one was killed);
130 interrupted (SIGINT), 143 terminated (SIGTERM).
A signal unwinds the command like an exception, so a file being written atomically is dropped
and nothing partial is left; `kpnet train` instead stops after the current step (see `stopped`).
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from kpnet.errors import KpnetError, KpnetWarning

JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print one JSON document on stdout; human output goes to stderr.")
]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Override a recipe key, e.g. --set train.batch_size=8 (repeatable).")
]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu or cuda.")]
DataOpt = Annotated[Path | None, typer.Option(
    "--data", help="Data folder: a Roboflow/CVAT-style export (train/, valid/ or val/, test/, each with its "
                   "_annotations.coco.json beside the images), or a folder laid out as the recipe's data.* keys.")]
SplitOpt = Annotated[str, typer.Option("--split", help="train, val or test.")]
DEVICES = ("cpu", "cuda")

EXIT_OK, EXIT_CHECK, EXIT_INPUT, EXIT_INTERNAL = 0, 1, 2, 3


def load_recipe_for_data(path: Path, overrides: list[str] | None, data: Path | None) -> Any:
    """The recipe at `path` pointed at `--data DIR` (found by `data.dataset.data_overrides`), then `--set` applied."""
    from kpnet.config import load_recipe
    from kpnet.data.dataset import data_overrides

    found = data_overrides(data) if data is not None else {}
    return load_recipe(path, [f"{k}={json.dumps(v)}" for k, v in found.items()] + list(overrides or []))


def check_device(device: str) -> str:
    """`--device` as given, or exit 2 when it is not cpu/cuda or CUDA is asked for without a CUDA device."""
    if device not in DEVICES:
        raise KpnetError("--device", f"expected one of {', '.join(DEVICES)}, got {device!r}")
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise KpnetError("--device", "cuda requested but no CUDA device is available")
    return device


@dataclass
class Output:
    """Where a command writes: `console` is stdout for humans, or stderr under `--json`."""

    json: bool = False
    debug: bool = False
    failed_checks: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.console = Console(stderr=self.json, highlight=False)
        self.err = Console(stderr=True, highlight=False)

    def print(self, *objects: Any, **kwargs: Any) -> None:
        self.console.print(*objects, **kwargs)

    def check(self, ok: bool, message: str) -> bool:
        """Record a user-requested check; a failed one makes the command exit 1 after its output."""
        if not ok:
            self.failed_checks.append(message)
        return ok


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def dumps(obj: Any) -> str:
    return json.dumps(obj, default=_json_default)


class Terminated(BaseException):
    """SIGTERM arrived: unwinds like KeyboardInterrupt (temporary files are removed on the way)."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated


def run(json_out: bool, debug: bool, body: Callable[[Output], dict[str, Any] | None]) -> None:
    """Run a command body, emit its result and exit with the documented code; each KpnetWarning it raises is one
    stderr line `warning: ...` (and, under --json, an entry of the document's `warnings`)."""
    out = Output(json=json_out, debug=debug)
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main else None
    seen: list[str] = []

    def show(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        if issubclass(category, KpnetWarning):
            seen.append(str(message))
            out.err.print(f"warning: {message}", markup=False, soft_wrap=True)
        else:
            original(message, category, *args, **kwargs)

    original = warnings.showwarning
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", KpnetWarning)
            warnings.showwarning = show
            result = body(out)
    except KpnetError as e:
        _fail(out, e.line(), e.exit_code, debug)
    except KeyboardInterrupt:
        _fail(out, "interrupted", 130, debug)
    except Terminated:
        _fail(out, "terminated (SIGTERM)", 143, debug)
    except typer.Exit:
        raise
    except Exception as e:  # an unexpected failure is a bug: say so in one line, code 3
        _fail(out, f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)",
              EXIT_INTERNAL, debug)
    finally:
        if main and previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if json_out:
        doc = dict(result or {})
        if seen:
            doc["warnings"] = seen
        doc["checks_failed"] = out.failed_checks
        sys.stdout.write(dumps(doc) + "\n")
        sys.stdout.flush()
    if out.failed_checks:
        for msg in out.failed_checks:
            out.err.print(f"check failed: {msg}", markup=False)
        raise typer.Exit(EXIT_CHECK)


def stopped(out: Output, line: str, code: int, doc: dict[str, Any]) -> None:
    """End a command that stopped early on purpose (a signal): one stderr line, `doc` under --json, exit `code`."""
    out.err.print(line, markup=False, soft_wrap=True)
    if out.json:
        sys.stdout.write(dumps({**doc, "exit_code": code}) + "\n")
        sys.stdout.flush()
    raise typer.Exit(code)


def _fail(out: Output, line: str, code: int, debug: bool) -> None:
    if debug:
        traceback.print_exc(file=sys.stderr)
    out.err.print(f"error: {line}", markup=False, soft_wrap=True)
    if out.json:
        sys.stdout.write(dumps({"error": line, "exit_code": code}) + "\n")
        sys.stdout.flush()
    raise typer.Exit(code)
