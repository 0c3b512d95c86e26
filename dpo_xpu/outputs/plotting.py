"""Reward-curve plots from a run's ``metrics.jsonl``, on a bare ``Figure`` (no pyplot state: works headless)."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from dpo_xpu.files import atomic_write_bytes

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
    """The rows of ``metrics.jsonl`` (or of a run folder's): its JSON objects with an integer ``step``. A line that is
    none (cut off mid-write, edited by hand, not UTF-8) is skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    rows = []
    for line in filter(str.strip, path.read_text(encoding="utf-8", errors="replace").splitlines()):
        with contextlib.suppress(json.JSONDecodeError):
            row = json.loads(line)
            if isinstance(row, dict) and type(row.get("step")) is int:  # not a bool either
                rows.append(row)
    return rows


def plot_reward_curves(
    metrics: str | Path | list[dict[str, Any]], out_path: str | Path | None = None, title: str | None = None
) -> Figure:
    """Chosen and rejected rewards (``beta * (log pi_theta(y|x) - log pi_ref(y|x))``, Rafailov et al. 2023, eq. 5),
    margin, accuracy and loss against the step, evaluation rows with markers: 1 x 4 panels, 16 x 3.6 inches.
    ``metrics``: a run folder, a ``metrics.jsonl`` path or the rows; ``out_path``: where to save the PNG."""
    rows = read_metrics(metrics) if isinstance(metrics, (str, Path)) else list(metrics)
    fig = Figure(figsize=(16, 3.6), layout="constrained")
    axes = fig.subplots(1, len(PANELS))
    for ax, (panel, keys, ylabel) in zip(axes, PANELS):
        for key in keys:
            name = key.split("/")[-1] if len(keys) > 1 else ""
            for prefix, style, label in (("", "-", name or "train"), ("eval/", "o--", f"eval {name}".strip())):
                metric = prefix + key
                points = [
                    (r["step"], r[metric]) for r in rows if "step" in r and isinstance(r.get(metric), (int, float))
                ]
                if points:
                    ax.plot(*zip(*points), style, label=label)
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
    if out_path is not None:  # atomic: a reader (a notebook, a viewer) never sees half a PNG
        png = io.BytesIO()
        fig.savefig(png, dpi=100, format="png")
        atomic_write_bytes(out_path, png.getvalue())
    return fig
