"""`kpnet fd-analysis`: false-discovery rates of several COCO results files side by side, as in the
triplet paper's Table 3, with differences against the first file and an optional bar chart."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from kpnet.cli.common import DebugOpt, JsonOpt, Output, run
from kpnet.errors import KpnetError

HELP = (
    "False-discovery rates of COCO bbox results files side by side (triplet paper, Table 3).\n\n"
    "FD = 1 − AP where COCOeval computes AP over IoU thresholds 0.05:0.05:0.5 with maxDets 100; FD5, "
    "FD25, FD50 at IoU 0.05, 0.25, 0.5; FD_S, FD_M, FD_L over all ten thresholds per COCO size. Each row "
    "after the first also shows its difference against the first (negative is better)."
)


def _names(names: list[str] | None, results: list[Path]) -> list[str]:
    if not names:
        return [p.stem for p in results]
    flat = [n.strip() for value in names for n in value.split(",") if n.strip()]
    if len(flat) != len(results):
        raise KpnetError("--names", f"got {len(flat)} names for {len(results)} results files")
    return flat


def _pct(v: float | None, signed: bool = False) -> str:
    if v is None:
        return "-"
    return f"{100.0 * v:+.1f}" if signed else f"{100.0 * v:.1f}"


def register(app: typer.Typer) -> None:
    @app.command("fd-analysis", help=HELP)
    def fd_analysis_cmd(
        results: Annotated[list[Path], typer.Argument(
            metavar="RESULTS", help="COCO results JSON files.", show_default=False)],
        gt: Annotated[Path, typer.Option("--gt", help="COCO ground-truth annotation JSON.", show_default=False)],
        names: Annotated[list[str] | None, typer.Option(
            "--names", help="Row names, comma-separated or repeated (default: file stems).")] = None,
        plot: Annotated[Path | None, typer.Option(
            "--plot", help="Write a PNG bar chart of the rates here.", show_default=False)] = None,
        json_out: JsonOpt = False,
        debug: DebugOpt = False,
    ) -> None:
        def body(out: Output) -> dict[str, Any]:
            from kpnet.analysis.fd import fd_deltas, plot_fd_bars
            from kpnet.data.validate import load_gt
            from kpnet.evaluation import FD_KEYS, fd_rates, load_dets

            labels = _names(names, results)
            truth = load_gt(gt)
            rates = [fd_rates(truth, load_dets(path, truth)) for path in results]
            deltas = fd_deltas(rates)
            table = Table(title=f"False-discovery rates (%) against {gt}")
            table.add_column("results")
            for key in FD_KEYS:
                table.add_column(key, justify="right")
            for i, (label, r, d) in enumerate(zip(labels, rates, deltas, strict=True)):
                table.add_row(label, *(_pct(r[k]) for k in FD_KEYS))
                if i:
                    table.add_row(f"  Δ vs {labels[0]}", *(_pct(d[k], signed=True) for k in FD_KEYS),
                                  style="dim")
            out.print(table)
            chart = None
            if plot is not None:
                chart = str(plot_fd_bars(labels, rates, plot))
                out.print(f"bar chart: {chart}")
            return {
                "gt": str(gt),
                "results": [{"name": label, "file": str(path), "fd": r, "delta": d}
                            for label, path, r, d in zip(labels, results, rates, deltas, strict=True)],
                "plot": chart,
            }

        run(json_out, debug, body)
