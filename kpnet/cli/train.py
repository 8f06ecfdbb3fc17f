"""`kpnet train RECIPE`: train a detector on CPU or CUDA with checkpoints and exact resume; under torchrun
(or with `--nproc-per-node N`, which starts torchrun's launcher itself) one rank of a distributed run."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from kpnet.cli.common import (DataOpt, DebugOpt, DeviceOpt, JsonOpt, Output, SetOpt, check_device, load_recipe_for_data,
                               run, stopped)

if TYPE_CHECKING:
    from kpnet.config import Recipe
    from kpnet.engine.distributed import World


def train_command(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML, e.g. recipes/quickstart.yaml.")],
    overrides: SetOpt = None,
    data: DataOpt = None,
    out: Annotated[Path | None, typer.Option("--out", help="Run directory (default runs/<recipe name>).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from <out>/last.pt where it stopped.")] = False,
    force: Annotated[bool, typer.Option(
        "--force", help="With --resume: continue even though the recipe differs from the checkpoint's.")] = False,
    device: DeviceOpt = "cpu",
    seed: Annotated[int | None, typer.Option("--seed", help="Seed for weights, sample order and augmentation.")] = None,
    nproc_per_node: Annotated[int | None, typer.Option(
        "--nproc-per-node", help="Train with this many processes on this machine (one per GPU), started through "
                                 "torchrun's launcher; train.batch_size is the global batch.")] = None,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Train a recipe; writes last.pt, metrics.jsonl and loss.png into the run directory.

    SIGTERM or Ctrl-C stops after the current step with last.pt written and the command that resumes
    (exit 143 / 130); a second one exits at once. One run at a time per run directory. Under torchrun
    (or --nproc-per-node) rank 0 logs and writes; a rank that dies ends the run (exit 4, last.pt kept).
    """
    from kpnet.engine.distributed import world_from_env

    world = world_from_env()
    if nproc_per_node is not None:
        run(json_out, debug, lambda o: _launch(nproc_per_node, recipe, overrides, seed, data, device))
        return

    def body(o: Output) -> dict[str, Any]:
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        from kpnet.engine import distributed
        from kpnet.engine import train as engine

        check_device(device)
        r = _recipe(recipe, overrides, seed, data)
        run_dir = out or Path("runs") / r.name
        split = distributed.plan(r.train, world.size, device, r.source or None)
        if not world.is_main:
            return _other_rank(r, run_dir, device, resume, force, world)
        if world.distributed or split.accumulate > 1:
            o.err.print(f"train {r.name}: {split.describe()}", soft_wrap=True)
        bar = Progress(
            TextColumn("[bold]train[/bold] {task.fields[name]}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("it {task.completed}/{task.total}"),
            TextColumn("{task.fields[rate]:.2f} it/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[losses]}"),
            console=o.err,
            transient=False,
        )
        task = bar.add_task("train", total=1, name=r.name, rate=0.0, losses="")
        live = o.err.is_terminal
        plan = {"total": 1, "next_line": 0}

        def start(first: int, total: int) -> None:
            bar.update(task, total=total, completed=first)
            plan["total"] = total
            plan["next_line"] = first
            if live:
                bar.start()

        def step(it: int, losses: dict[str, float], rate: float) -> None:
            text = " ".join(f"{k}={v:.4f}" for k, v in losses.items())
            bar.update(task, completed=it, rate=rate, losses=text)
            if not live and (it >= plan["next_line"] or it == plan["total"]):
                # Logs and pipes get a plain line every 5 % instead of a redrawn bar.
                eta = (plan["total"] - it) / rate if rate > 0 else 0.0
                o.err.print(f"train {r.name} it {it}/{plan['total']} {rate:.2f} it/s ETA {eta:.0f} s {text}",
                            soft_wrap=True)
                plan["next_line"] = it + max(1, plan["total"] // 20)

        halt = None
        try:
            summary = engine.train(r, run_dir, device=device, resume=resume, progress=engine.Progress(start, step),
                                   force=force)
        except engine.Stopped as s:
            halt = s
        except distributed.PeerLost as e:
            raise distributed.PeerLost(None, f"{e.message}; resume with: {resume_command(sys.argv[1:])}") from None
        finally:
            if live:
                bar.stop()
        if halt is not None:
            command = resume_command(sys.argv[1:])
            stopped(o, f"stopped at iteration {halt.iteration}; resume with: {command}", halt.exit_code,
                    {"stopped": True, "iteration": halt.iteration, "checkpoint": str(halt.checkpoint), "resume": command})
        o.print(f"checkpoint: {summary['checkpoint']}  ({summary['iterations']} iterations, {summary['seconds']:.1f} s)")
        if summary["loss_plot"]:
            o.print(f"loss curve: {summary['loss_plot']}")
        return {"recipe": str(recipe), "name": r.name, **summary}

    # Ranks other than 0 print their errors only (prefixed with the rank) and no --json document.
    run(json_out and world.is_main, debug, body)


def _recipe(recipe: Path, overrides: list[str] | None, seed: int | None, data: Path | None) -> Recipe:
    sets = list(overrides or [])
    if seed is not None:
        sets.append(f"train.seed={seed}")
    return load_recipe_for_data(recipe, sets, data)


def _other_rank(r: Recipe, run_dir: Path, device: str, resume: bool, force: bool, world: World) -> dict[str, Any]:
    """A rank other than 0: train silently; stop with rank 0 (which says why), name the rank on an error."""
    from kpnet.engine import train as engine
    from kpnet.errors import KpnetError

    try:
        engine.train(r, run_dir, device=device, resume=resume, force=force)
    except engine.Stopped as s:
        raise typer.Exit(s.exit_code) from None
    except KpnetError as e:
        raise type(e)(f"rank {world.rank}", e.line()) from None
    raise typer.Exit(0)


def resume_command(argv: list[str]) -> str:
    """The command line that continues this run: the same arguments with --resume (under torchrun, its line)."""
    from kpnet.engine.distributed import resume_hint

    return resume_hint(argv)


def _launch(nproc: int, recipe: Path, overrides: list[str] | None, seed: int | None, data: Path | None,
            device: str) -> None:
    """`--nproc-per-node N`: check the recipe and the batch split once here, then run N ranks through torchrun's
    launcher with the same arguments (without --nproc-per-node) and exit with their code."""
    from kpnet.engine import distributed
    from kpnet.errors import KpnetError

    if distributed.world_from_env().distributed:
        raise KpnetError("--nproc-per-node", "this process is already one rank of a torchrun run; drop --nproc-per-node")
    check_device(device)
    r = _recipe(recipe, overrides, seed, data)
    distributed.plan(r.train, nproc, device, r.source or None)
    argv = sys.argv[1:]
    worker_argv = _without_option(argv, "--nproc-per-node")
    code = distributed.launch(nproc, worker_argv, "kpnet " + shlex.join(argv), device)
    raise typer.Exit(code)


def _without_option(argv: list[str], name: str) -> list[str]:
    """`argv` without `name VALUE` / `name=VALUE`."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(f"{name}="):
            out.append(arg)
    return out


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
