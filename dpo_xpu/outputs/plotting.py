"""Reward-curve plots from a run's ``metrics.jsonl``.

Drawn on a bare ``matplotlib.figure.Figure`` (no pyplot state), so plotting works headless, in scripts,
under papermill and in JupyterLab alike.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "reward_curves.png"

#: (panel title, metric names drawn in it, y-axis label)
PANELS: list[tuple[str, list[str], str]] = [
    ("Rewards", ["rewards/chosen", "rewards/rejected"], "beta * log-ratio (nats)"),
    ("Reward margin", ["rewards/margins"], "chosen - rejected (nats)"),
    ("Reward accuracy", ["rewards/accuracies"], "fraction of pairs"),
    ("DPO loss", ["loss"], "loss (nats)"),
]


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Read ``metrics.jsonl`` (or a run folder holding it) into a list of dicts, one per logged step.

    A last line cut off mid-write (training still running) is skipped.

    Raises:
        FileNotFoundError: no metrics file at ``path``.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    rows = []
    for line in filter(str.strip, path.read_text(encoding="utf-8").splitlines()):
        with contextlib.suppress(json.JSONDecodeError):
            rows.append(json.loads(line))
    return rows


def _series(rows: Iterable[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and "step" in row:
            xs.append(row["step"])
            ys.append(value)
    return xs, ys


def plot_reward_curves(
    metrics: str | Path | list[dict[str, Any]],
    out_path: str | Path | None = None,
    title: str | None = None,
) -> Figure:
    """Draw chosen and rejected rewards, margin, accuracy and loss against the optimizer step.

    Rewards are ``beta * (log pi_theta(y|x) - log pi_ref(y|x))`` (Rafailov et al. 2023, eq. 5 and section 5),
    as logged by TRL. Evaluation rows (``eval/...`` names) are drawn with markers in the same panels.

    Args:
        metrics: a run folder, a ``metrics.jsonl`` path, or the rows themselves.
        out_path: where to save the PNG (e.g. ``run_dir / "reward_curves.png"``); ``None`` saves nothing.
        title: figure title; default none.

    Returns:
        The figure (1 x 4 panels, 16 x 3.6 inches).
    """
    rows = read_metrics(metrics) if isinstance(metrics, (str, Path)) else list(metrics)
    fig = Figure(figsize=(16, 3.6), layout="constrained")
    axes = fig.subplots(1, len(PANELS))
    for ax, (panel, keys, ylabel) in zip(axes, PANELS):
        for key in keys:
            xs, ys = _series(rows, key)
            if xs:
                ax.plot(xs, ys, label=key.split("/")[-1] if len(keys) > 1 else "train")
            exs, eys = _series(rows, "eval/" + key)
            if exs:
                ax.plot(exs, eys, "o--", label=("eval " + key.split("/")[-1]) if len(keys) > 1 else "eval")
        if keys == ["loss"]:
            ax.axhline(math.log(2), color="grey", linestyle=":", label="ln 2 (start)")
        if keys == ["rewards/accuracies"]:
            ax.set_ylim(-0.05, 1.05)
        ax.set(title=panel, xlabel="step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    if out_path is not None:
        fig.savefig(out_path, dpi=100)
    return fig
