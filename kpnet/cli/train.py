"""`kpnet train RECIPE`: train a detector on CPU or CUDA with checkpoints and exact resume."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from kpnet.cli.common import (DataOpt, DebugOpt, DeviceOpt, JsonOpt, Output, SetOpt, check_device, load_recipe_for_data,
                               run, stopped)


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
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Train a recipe; writes last.pt, metrics.jsonl and loss.png into the run directory.

    SIGTERM or Ctrl-C stops after the current step with last.pt written and the command that resumes
    (exit 143 / 130); a second one exits at once. One run at a time per run directory.
    """

    def body(o: Output) -> dict[str, Any]:
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        from kpnet.engine import train as engine

        check_device(device)
        sets = list(overrides or [])
        if seed is not None:
            sets.append(f"train.seed={seed}")
        r = load_recipe_for_data(recipe, sets, data)
        run_dir = out or Path("runs") / r.name
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

    run(json_out, debug, body)


def resume_command(argv: list[str]) -> str:
    """The command line that continues this run: the same arguments with --resume."""
    return "kpnet " + shlex.join(argv if "--resume" in argv else [*argv, "--resume"])


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
