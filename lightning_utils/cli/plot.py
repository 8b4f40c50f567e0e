"""``lightning-utils plot METRICS.jsonl [...] -o loss.png``: draw logged metrics against step.

Reads the JSON lines that :class:`~lightning_utils.callbacks.MetricsPrinter` writes (lines that
are not JSON objects, e.g. interleaved log output, are skipped; a ``Training Metrics: {...}``
prefix is tolerated) and draws the chosen metrics against ``step`` with matplotlib, which is an
optional extra (``pip install 'lightning-utils[plot]'``) imported only when plotting.

This module must never import matplotlib at import time, and never overwrite an input file.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["add_arguments", "main", "plot_metrics", "read_metrics", "run", "select_series"]

MATPLOTLIB_MISSING = (
    "lightning-utils plot needs matplotlib, which is not installed. "
    "Install it with: pip install 'lightning-utils[plot]'  (or: pip install matplotlib)"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", type=Path, metavar="METRICS.jsonl", help="JSON-lines metrics file(s)")
    parser.add_argument(
        "-o", "--output", type=Path, default=Path("metrics.png"), help="image to write (default: metrics.png)"
    )
    parser.add_argument(
        "-m",
        "--metrics",
        nargs="+",
        default=None,
        metavar="NAME",
        help="metrics to draw (default: every metric whose name contains 'loss', else all)",
    )
    parser.add_argument("-x", "--x", default="step", help="the x-axis key (default: step)")
    parser.add_argument("--logy", action="store_true", help="logarithmic y axis")
    parser.add_argument("--title", default=None, help="figure title")


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The JSON-object lines of ``path`` and how many other non-empty lines were skipped."""
    if path.is_dir():
        raise FileNotFoundError(f"metrics file {str(path)!r} is a directory, not a JSON-lines file")
    if not path.is_file():
        raise FileNotFoundError(f"metrics file {str(path)!r} does not exist")
    records: list[dict[str, Any]] = []
    skipped = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            start = line.find("{")
            try:
                obj = json.loads(line[start:]) if start >= 0 else None
            except json.JSONDecodeError:
                obj = None
            if isinstance(obj, dict):
                records.append(obj)
            else:
                skipped += 1
    return records, skipped


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.lower() in ("nan", "inf", "-inf"):
        return float(value)
    return None


def select_series(
    records: Iterable[dict[str, Any]], metrics: Sequence[str] | None = None, x: str = "step"
) -> dict[str, tuple[list[float], list[float]]]:
    """``{metric: (xs, ys)}`` for the chosen metrics (see ``--metrics`` for the default)."""
    records = list(records)
    numeric: list[str] = []
    for rec in records:
        for key, value in rec.items():
            if key != x and key not in numeric and _number(value) is not None:
                numeric.append(key)
    if metrics is None:
        chosen = [k for k in numeric if "loss" in k.lower()] or [k for k in numeric if k not in ("epoch",)]
    else:
        missing = [m for m in metrics if m not in numeric]
        if missing:
            raise KeyError(f"metric(s) {missing} not found; the file has {numeric}")
        chosen = list(metrics)
    series: dict[str, tuple[list[float], list[float]]] = {}
    for key in chosen:
        xs, ys = [], []
        for i, rec in enumerate(records):
            y = _number(rec.get(key))
            xv = _number(rec.get(x)) if x in rec else float(i)
            if y is None or xv is None or not math.isfinite(y):
                continue
            xs.append(xv)
            ys.append(y)
        series[key] = (xs, ys)
    return series


def plot_metrics(
    series_by_file: dict[str, dict[str, tuple[list[float], list[float]]]],
    output: Path,
    x: str = "step",
    logy: bool = False,
    title: str | None = None,
) -> Path:
    """Draw the series into ``output``; raise ``ModuleNotFoundError`` when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: never open a window or need a display
        import matplotlib.pyplot as plt
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(MATPLOTLIB_MISSING) from err
    fig, ax = plt.subplots(figsize=(8, 4.5))
    try:
        _draw(ax, series_by_file, x, logy, title)
        fig.tight_layout()
        output.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(output, dpi=120)
    finally:
        plt.close(fig)  # also when saving failed: no figure left open in a long-lived process
    return output


def _draw(
    ax: Any,
    series_by_file: dict[str, dict[str, tuple[list[float], list[float]]]],
    x: str,
    logy: bool,
    title: str | None,
) -> None:
    several = len(series_by_file) > 1
    for name, series in series_by_file.items():
        for metric, (xs, ys) in series.items():
            ax.plot(xs, ys, label=f"{name}: {metric}" if several else metric, linewidth=1.2)
    ax.set_xlabel(x)
    if logy:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)


def run(args: argparse.Namespace) -> int:
    output: Path = args.output
    if any(output.resolve() == f.resolve() for f in args.files):
        print(f"error: output {str(output)!r} is one of the input files", file=sys.stderr)
        return 2
    series_by_file: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    for path in args.files:
        try:
            records, skipped = read_metrics(path)
            series = select_series(records, args.metrics, args.x)
        except (FileNotFoundError, KeyError) as err:
            print(f"error: {path}: {err.args[0] if err.args else err}", file=sys.stderr)
            return 2
        except OSError as err:  # unreadable (permissions, a device, an I/O error)
            print(f"error: cannot read {path}: {err.strerror or err}", file=sys.stderr)
            return 2
        if skipped:
            print(f"{path}: skipped {skipped} line(s) that are not JSON objects", file=sys.stderr)
        if not any(ys for _, ys in series.values()):
            print(f"error: {path}: no numeric values to plot", file=sys.stderr)
            return 2
        series_by_file[str(path)] = series
    try:
        plot_metrics(series_by_file, output, args.x, args.logy, args.title)
    except ModuleNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as err:  # e.g. a folder in the way, or a format matplotlib lacks
        print(f"error: cannot write {output}: {err}", file=sys.stderr)
        return 2
    drawn = sorted({m for s in series_by_file.values() for m in s})
    print(f"wrote {output} ({', '.join(drawn)} against {args.x})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lightning_utils.cli.plot ...`` (the same as ``lightning-utils plot ...``)."""
    parser = argparse.ArgumentParser(prog="lightning-utils plot", description="draw logged metrics against step")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover - exercised through a subprocess test
    sys.exit(main())
