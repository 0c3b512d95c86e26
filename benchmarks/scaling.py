"""How pairs/s and peak memory grow with ``max_length`` and batch: a table, a figure, and the planner beside each peak.

For each compute dtype, batch and ``max_length`` (a cell), ``dpo_step.py`` runs each strategy in its own process,
in interleaved rounds (:func:`dpo_step.run_rounds`, the fastest round kept), on the longest orca rows that fit whole
in ``max_length`` (``--rows longest``: of the rows whose prompt and both answers fit uncut, the ``steps x batch``
longest, so that each batch is padded to near ``max_length``; each cell records its rows' lengths). Each row gets
what ``dpo_step.py`` measures (``pairs_per_s`` from model loading to the end of training, ``peak_memory_mib``, the
planner's ``planner_mib`` and ``planner_error`` = estimate / measured - 1) plus ``step_pairs_per_s``: the batch
over the mean wall time of the training steps after the first (the first alone with one step), the steady speed
without loading, precompute and warm-up.

Commands (from the project root)::

    python benchmarks/scaling.py                      # the full sweep: hours on a GPU, days on 2 CPU cores
    python benchmarks/scaling.py --steps 2 --rounds 1 --dtypes float32    # a first pass
    python benchmarks/scaling.py --report             # the table and figure again, from the JSON alone
    python benchmarks/scaling.py --rerun defaults     # the defaults again in every cell measured, TRL's rows kept
    python benchmarks/scaling.py --report --replan    # the planner column again, with the installed planner

Cells already in ``--out`` with the same model, steps and rounds are kept, so an interrupted sweep continues where
it stopped (a cell where a strategy failed runs again; ``--fresh`` starts over). Outputs: the JSON
(``benchmarks/results/scaling-<device>.json``: ``machine`` with versions and commit, ``settings``, ``cells``), its
markdown table beside it (``.md``) and the figure (``docs/assets/scaling-<device>.png``: pairs/s and peak memory
against ``max_length``, one line per strategy and batch, one row of plots per dtype).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dpo_step  # noqa: E402 - the sibling script, run as a module

logger = logging.getLogger("scaling")
STRATEGIES = ("defaults", "trl-precompute", "trl-peft")
#: The row values a cell keeps from ``dpo_step.py``'s result row.
KEPT = ("pairs_per_s", "peak_memory_mib", "planner_mib", "planner_error", "first_loss", "last_loss", "mfu")
KEPT += ("rounds_pairs_per_s", "step_seconds", "sequence_tokens", "answer_share", "position_share", "seconds")
KEPT += ("phase_peaks_mib", "peak_rss_mib")


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=dpo_step.DEFAULT_MODEL, help="as dpo_step.py's (default smollm2)")
    parser.add_argument("--device", default="cpu", help="cpu (default), xpu, cuda")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated dpo_step.py strategies")
    parser.add_argument("--max-lengths", type=_ints, default=[256, 512, 1024], help="default 256,512,1024")
    parser.add_argument("--batches", type=_ints, default=[1, 2, 4], help="pairs per step, default 1,2,4")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="compute dtypes, in this order")
    parser.add_argument("--steps", type=int, default=4, help="training steps per run (default 4)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds, fastest kept (default 3)")
    parser.add_argument("--rows", choices=("longest", "fit", "first"), default="longest", help="dpo_step.py's")
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/results/scaling-<device>.json")
    parser.add_argument("--figure", type=Path, default=None, help="default docs/assets/scaling-<device>.png")
    parser.add_argument("--work-dir", type=Path, default=dpo_step.CACHE / "benchmark-work" / "scaling")
    parser.add_argument("--fresh", action="store_true", help="run every cell again")
    parser.add_argument(
        "--rerun",
        default="",
        help="comma-separated strategies to run again in the cells already measured, replacing their rows (e.g. "
        "defaults, after a change to dpo_xpu); the other strategies' rows are kept",
    )
    parser.add_argument(
        "--one-process",
        action="store_true",
        help="run everything in this process, one round (no start-up per run: for a GPU, whose allocator's peak is "
        "reset before each strategy; on a CPU the resident peak would carry earlier runs' leftovers)",
    )
    parser.add_argument("--report", action="store_true", help="only write the table and figure from --out")
    parser.add_argument(
        "--replan",
        action="store_true",
        help="with --report: each row's planner estimate again with the installed planner, from the shares the row "
        "recorded (after a change to dpo_xpu.train.memory; nothing is run)",
    )
    args = parser.parse_args(argv)
    if args.replan and not args.report:
        parser.error("--replan goes with --report (it recomputes the planner column of --out; nothing is run)")
    unknown = sorted({d for d in args.dtypes.split(",")} - {"float32", "bfloat16"})
    if unknown:
        parser.error(f"--dtypes: unknown {unknown}: choose from float32, bfloat16")
    return args


def run_cell(args: argparse.Namespace, dtype: str, batch: int, max_length: int, gflops: tuple[float, float]) -> dict:
    """One cell: each strategy in its own process, ``args.rounds`` rounds (with ``--one-process`` all of them in this
    process, once); ``{"dtype", "batch", "max_length", "rows": [...]}``, a failed strategy's row holding its
    ``error``."""
    argv = ["--model", args.model, "--device", args.device, "--steps", str(args.steps), "--batch", str(batch)]
    argv += ["--max-length", str(max_length), "--rows", args.rows, "--bf16", "on" if dtype == "bfloat16" else "off"]
    argv += ["--work-dir", str(args.work_dir)]
    results: dict[str, Any] = {}
    for strategies in [args.strategies.split(",")] if args.one_process else [[s] for s in args.strategies.split(",")]:
        try:
            if args.one_process:
                extra = [
                    "--in-process",
                    "--strategies",
                    ",".join(strategies),
                    "--matmul-gflops",
                    f"{gflops[0]},{gflops[1]}",
                ]
                payload = dpo_step.main([*argv, *extra, "--out", str(args.work_dir / "cell.json")])
            else:
                payload = dpo_step.run_rounds(argv, strategies, args.rounds, args.work_dir, gflops)
            results.update({row["strategy"]: row for row in payload["results"]})
        except Exception as exc:  # noqa: BLE001 - out of memory, a failed process...: keep the reason, go on
            logger.warning("%s %s batch %d max_length %d failed: %s", dtype, strategies, batch, max_length, exc)
            lines = [line for line in str(exc).splitlines() if line.strip() and "it/s]" not in line]
            results.update({name: "\n".join(lines[:1] + lines[-3:])[-600:] or repr(exc) for name in strategies})
    rows = []
    for strategy, result in results.items():
        if isinstance(result, str):
            rows.append({"strategy": strategy, "error": result})
            continue
        row = {"strategy": strategy, **{key: result.get(key) for key in KEPT}}
        after_first = (row["step_seconds"] or [])[1:] or row["step_seconds"]
        row["step_pairs_per_s"] = batch / statistics.fmean(after_first) if after_first else None
        rows.append(row)
    return {"dtype": dtype, "batch": batch, "max_length": max_length, "rows": rows}


def replan(payload: dict) -> None:
    """Put the installed planner's ``planner_mib`` and ``planner_error`` on every measured row, from the shares it
    recorded (``answer_share``, ``position_share``) and its cell's dtype, batch and ``max_length``."""
    from types import SimpleNamespace

    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(dpo_step.model_folder(payload["settings"]["model"]))
    for cell in payload["cells"]:
        dtype, batch, max_length = cell_key(cell)
        settings = SimpleNamespace(
            batch=batch,
            max_length=max_length,
            gradient_checkpointing=True,  # as every cell runs
            bf16=dtype == "bfloat16",
            device=payload["settings"]["device"],
        )
        if settings.device.startswith("cpu"):  # the peak is resident memory (rows from before it was kept)
            for row in cell["rows"]:
                row.setdefault("peak_rss_mib", row.get("peak_memory_mib"))
        dpo_step.plan_rows(settings, config, cell["rows"])


def cell_key(cell: dict) -> tuple[str, int, int]:
    """``(dtype, batch, max_length)`` of a cell."""
    return cell["dtype"], cell["batch"], cell["max_length"]


def markdown(payload: dict) -> str:
    """The cells as a markdown table, then the machine, versions, commit and how the numbers were taken."""
    head = (
        "| dtype | batch | max_length | rows' tokens | strategy | pairs/s | pairs/s in steps | peak MiB "
        "| planner MiB | planner error |"
    )
    lines = [head, "|---|---:|---:|---|---|---:|---:|---:|---:|---:|"]
    for cell in payload["cells"]:
        for r in cell["rows"]:
            where = f"| {cell['dtype']} | {cell['batch']} | {cell['max_length']} |"
            if r.get("error"):
                lines.append(f"{where} | {r['strategy']} | failed: {r['error'].splitlines()[-1][:80]} | | | | |")
                continue
            tokens = r.get("sequence_tokens") or [0]
            steps = f"{r['step_pairs_per_s']:.3f}" if r.get("step_pairs_per_s") else "-"
            lines.append(
                f"{where} {min(tokens)}-{max(tokens)} | {r['strategy']} | {r['pairs_per_s']:.3f} | {steps} "
                f"| {r['peak_memory_mib']:,.0f} | {r['planner_mib']:,.0f} | {100 * r['planner_error']:+.0f}% |"
            )
    machine, settings = payload["machine"], payload["settings"]
    versions = ", ".join(f"{k} {v}" for k, v in machine.get("versions", {}).items())
    lines += [
        "",
        f"{machine['processor']}, {machine['cpu_count']} cores, {machine['platform']}"
        + (f", {machine['device_name']}" if machine.get("device_name") else "")
        + f"; {versions}; commit {machine.get('commit')}. {settings['model']}, NF4 + LoRA r16, "
        f"{settings['steps']} steps, {settings['rounds']} round(s) (fastest kept), rows: {settings['rows']}. "
        "pairs/s: from model loading to the end of training; pairs/s in steps: the training steps after the first; "
        "peak: resident memory over the process's before loading (CPU), the allocator's peak (GPU); planner: "
        "`dpo_xpu.train.memory.estimate_memory`, error = estimate / the training phase's peak - 1 (on a CPU model "
        "loading can peak higher; the peak column holds the higher one).",
    ]
    if payload.get("note"):
        lines.append(f"\n{payload['note']}")
    return "\n".join(lines) + "\n"


def plot(payload: dict, path: Path) -> Path:
    """pairs/s and peak memory against ``max_length``, one line per strategy (colour) and batch (line style), one
    row of plots per dtype; written to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = list(dict.fromkeys(cell["dtype"] for cell in payload["cells"]))
    fig, axes = plt.subplots(len(dtypes), 2, figsize=(11, 3.8 * len(dtypes)), squeeze=False)
    styles = ["-", "--", ":", "-."]
    batches = sorted({cell["batch"] for cell in payload["cells"]})
    strategies = list(dict.fromkeys(r["strategy"] for cell in payload["cells"] for r in cell["rows"]))
    lengths_run = sorted({cell["max_length"] for cell in payload["cells"]})
    for row_axes, dtype in zip(axes, dtypes, strict=True):
        for s_index, strategy in enumerate(strategies):
            for b_index, batch in enumerate(batches):
                points = sorted(
                    (cell["max_length"], r)
                    for cell in payload["cells"]
                    if cell["dtype"] == dtype and cell["batch"] == batch
                    for r in cell["rows"]
                    if r["strategy"] == strategy and not r.get("error")
                )
                if not points:
                    continue
                lengths = [length for length, _ in points]
                style = {"color": f"C{s_index}", "linestyle": styles[b_index % 4], "marker": "o"}
                label = f"{strategy}, batch {batch}"
                speed = [r.get("step_pairs_per_s") or r["pairs_per_s"] for _, r in points]
                row_axes[0].plot(lengths, speed, label=label, **style)
                row_axes[1].plot(lengths, [r["peak_memory_mib"] for _, r in points], label=label, **style)
        row_axes[0].set(title=f"{dtype}: pairs/s in training steps", xlabel="max_length (tokens)", ylabel="pairs/s")
        row_axes[1].set(title=f"{dtype}: peak memory", xlabel="max_length (tokens)", ylabel="MiB")
        for ax in row_axes:
            ax.set_xscale("log", base=2)
            ax.set_xticks(lengths_run, [str(n) for n in lengths_run])
            ax.grid(alpha=0.3)
        row_axes[1].legend(fontsize=7)
    machine = payload["machine"]
    fig.suptitle(f"{payload['settings']['model']} on {machine.get('device_name') or machine['processor']}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(payload: dict, out: Path, figure: Path) -> None:
    """The JSON at ``out``, its table at ``out`` with ``.md``, and the figure (when a cell has a measured row)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(payload))
    if any(not r.get("error") for cell in payload["cells"] for r in cell["rows"]):
        plot(payload, figure)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    kind = args.device.split(":")[0]
    out = args.out or dpo_step.PROJECT_ROOT / "benchmarks" / "results" / f"scaling-{kind}.json"
    figure = args.figure or dpo_step.PROJECT_ROOT / "docs" / "assets" / f"scaling-{kind}.png"
    settings = {"model": args.model, "device": args.device, "steps": args.steps, "rounds": args.rounds}
    settings["rows"] = args.rows
    old = json.loads(out.read_text()) if out.is_file() and not args.fresh else None
    if args.report:
        if old is None:
            sys.exit(f"--report: no results at {out} (run the sweep first, or pass --out)")
        if args.replan:
            replan(old)
        write(old, out, figure)
        return old
    same = old is not None and all(old["settings"].get(k) == v for k, v in settings.items())
    # a cell with a failed strategy runs again
    cells = [c for c in old["cells"] if not any(r.get("error") for r in c["rows"])] if same else []
    if same:
        gflops = (old["matmul_bf16_gflops"], old["matmul_fp32_gflops"])
    else:
        size = 512 if args.model == "tiny" else 2048
        gflops = tuple(dpo_step.matmul_gflops(args.device, dtype, n=size) for dtype in ("bfloat16", "float32"))
    payload = {
        "machine": dpo_step.machine_info(args.device),
        "matmul_bf16_gflops": gflops[0],
        "matmul_fp32_gflops": gflops[1],
        "settings": settings,
        "cells": cells,
    }
    done = {(c["dtype"], c["batch"], c["max_length"]) for c in cells}
    if args.rerun:
        again = argparse.Namespace(**{**vars(args), "strategies": args.rerun})
        for cell in [c for c in cells if c["dtype"] in args.dtypes.split(",")]:
            logger.info("cell %s, batch %d, max_length %d: %s again ...", *cell_key(cell), args.rerun)
            fresh = {r["strategy"]: r for r in run_cell(again, *cell_key(cell), gflops)["rows"]}
            kept = [fresh.pop(r["strategy"], r) for r in cell["rows"]]  # in place, in the cell's order
            cell["rows"] = kept + list(fresh.values())
            write(payload, out, figure)
    for dtype in args.dtypes.split(","):
        for batch in args.batches:
            for max_length in args.max_lengths:
                if (dtype, batch, max_length) in done:
                    continue
                logger.info("cell %s, batch %d, max_length %d ...", dtype, batch, max_length)
                cells.append(run_cell(args, dtype, batch, max_length, gflops))
                write(payload, out, figure)  # after each cell: an interrupted sweep keeps what it measured
    write(payload, out, figure)
    print(markdown(payload))
    return payload


if __name__ == "__main__":
    main()
