"""The ``dpo-xpu`` command line.

    dpo-xpu env [--json] [--backend native|ipex-llm] [--recipe FILE]   # report; exit 1 on an error verdict
    dpo-xpu train --recipe FILE [--set key=value ...] [--overwrite | --resume]
    dpo-xpu plot RUN_DIR                                  # redraw RUN_DIR/reward_curves.png
    dpo-xpu demo-model [DEST]                             # build the offline demo's tiny model

Errors a user can cause print one line (``dpo-xpu: error: ...``) and exit 2, without a traceback.
Heavy imports happen inside the commands, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from dpo_xpu.errors import DpoXpuError


def _cmd_env(args: argparse.Namespace) -> int:
    from dpo_xpu.environment import check_environment

    recipe = None
    if args.recipe:
        from dpo_xpu.recipes import load_recipe

        recipe = load_recipe(args.recipe, overrides=args.set)
    report = check_environment(backend=args.backend, recipe=recipe)
    print(json.dumps(report.to_dict(), indent=2, default=str) if args.json else report.to_table())
    return 1 if report.has_errors else 0


def _cmd_train(args: argparse.Namespace) -> int:
    from dpo_xpu.distributed import is_main_process
    from dpo_xpu.errors import TrainingInterrupted
    from dpo_xpu.pipeline import run_training
    from dpo_xpu.recipes import load_recipe

    recipe = load_recipe(args.recipe, overrides=args.set)
    try:
        result = run_training(recipe, overwrite=args.overwrite, live_plot=False, resume=args.resume)
    except TrainingInterrupted as exc:
        if is_main_process():  # every rank stopped at the same step: rank 0 says so
            sets = "".join(f" --set {item}" for item in args.set)
            print(f"dpo-xpu: {exc}", file=sys.stderr, flush=True)
            print(f"dpo-xpu: resume with: dpo-xpu train --recipe {args.recipe}{sets} --resume", file=sys.stderr)
        _leave_together()
        return exc.exit_code
    if not is_main_process():
        return 0
    last = next((row for row in reversed(result.metrics) if "loss" in row), {})
    print(f"run folder: {result.run_dir}")
    print(f"  metrics:       {result.run_dir / 'metrics.jsonl'} ({len(result.metrics)} rows)")
    print(f"  reward curves: {result.curves_png}")
    print(f"  adapter:       {result.adapter_dir}")
    if last:
        print(
            f"  last step {last['step']}: loss {last.get('loss'):.4f}, "
            f"accuracy {last.get('rewards/accuracies', float('nan')):.2f}, "
            f"margin {last.get('rewards/margins', float('nan')):.4f}"
        )
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from dpo_xpu.outputs.plotting import CURVES_FILE, METRICS_FILE, plot_reward_curves

    run_dir = Path(args.run_dir)
    if not (run_dir / METRICS_FILE).is_file():
        raise DpoXpuError(f"{run_dir / METRICS_FILE} does not exist: give a run folder written by 'dpo-xpu train'")
    out = run_dir / CURVES_FILE
    plot_reward_curves(run_dir, out_path=out)
    print(out)
    return 0


def _cmd_demo_model(args: argparse.Namespace) -> int:
    from dpo_xpu.demo import build_demo_model

    print(build_demo_model(args.dest, force=args.force))
    return 0


def _first_sentence(text: str, limit: int = 110) -> str:
    text = " ".join(text.split())
    end = text.find(". ")
    text = text[: end + 1] if end >= 0 else text
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _plain(markdown: str) -> str:
    """The docs' Markdown as terminal text: no code backticks, no escaped pipes, links as their text."""
    import re

    return re.sub(r"\[([^\]]+)\]\([^)]+\)", r"\1", markdown.replace("\\|", "|").replace("`", ""))


def _train_epilog() -> str:
    """The recipe keys for ``dpo-xpu train --help``: dpo_xpu's own (default, unit and meaning from the Recipe's field
    metadata, TRL's default where it differs), then every option of the installed TRL's DPOConfig with its default
    and the first sentence of TRL's help."""
    import dataclasses

    import trl
    from trl import DPOConfig

    from dpo_xpu.recipes import key_docs, trl_default_differences, trl_option_names

    differs = trl_default_differences()
    lines = ["dpo_xpu's recipe keys (default [unit]: meaning; docs/options.md has the sources):"]
    for key, doc in key_docs().items():
        trl_default = f" (TRL's default: {differs[key][1]!r})" if key in differs else ""
        meaning = _first_sentence(_plain(doc["help"]))
        lines.append(f"  {key} = {doc['default']!r}{trl_default} [{_plain(doc['unit'])}]: {meaning}")
    helps = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(DPOConfig)}
    lines += ["", f"TRL {trl.__version__}'s DPOConfig options, under their own names (TRL's defaults):"]
    for name, default in sorted(trl_option_names().items()):
        lines.append(f"  {name} = {default!r}: {_first_sentence(helps.get(name, ''))}".rstrip(": "))
    return "\n".join(lines)


def build_parser(with_options: bool = False) -> argparse.ArgumentParser:
    """The argument parser of ``dpo-xpu`` (sub-commands env, train, plot, demo-model).

    Args:
        with_options: list every recipe key and TRL option in ``train --help`` (imports TRL, so only for help).
    """
    from dpo_xpu.recipes import BACKENDS

    parser = argparse.ArgumentParser(prog="dpo-xpu", description="DPO with NF4 + LoRA on Intel GPUs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    env = sub.add_parser("env", help="report the device, driver, oneAPI and package versions")
    env.add_argument("--json", action="store_true", help="print the report as JSON")
    env.add_argument("--backend", choices=BACKENDS, default=None)
    env.add_argument("--recipe", help="also say whether this recipe is expected to fit the device's memory")
    env.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    env.set_defaults(func=_cmd_env)

    train = sub.add_parser(
        "train",
        help="train with DPO from a recipe",
        description="Train with DPO from a recipe. Every recipe key can be set with --set KEY=VALUE.",
        epilog=_train_epilog() if with_options else "dpo-xpu train --help lists every recipe key and TRL option.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--recipe", required=True, help="YAML recipe (see recipes/)")
    train.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key (repeatable)"
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="move a run already in output_dir aside (to OUTPUT_DIR.previous) and start again",
    )
    train.add_argument(
        "--resume", action="store_true", help="continue the run in output_dir from its newest complete checkpoint"
    )
    train.set_defaults(func=_cmd_train)

    plot = sub.add_parser("plot", help="draw RUN_DIR/reward_curves.png from RUN_DIR/metrics.jsonl")
    plot.add_argument("run_dir")
    plot.set_defaults(func=_cmd_plot)

    demo = sub.add_parser("demo-model", help="build the offline demo's tiny ChatML model")
    demo.add_argument("dest", nargs="?", default="runs/demo-model")
    demo.add_argument("--force", action="store_true", help="rebuild even if already built")
    demo.set_defaults(func=_cmd_demo_model)
    return parser


def _leave_together() -> None:
    """Under several processes, wait until every rank got here (rank 0 has said why they stop) before exiting:
    torchrun stops the other ranks as soon as one exits with an error, which would cut rank 0's last lines."""
    from dpo_xpu.distributed import barrier

    try:
        barrier()
    except Exception:  # noqa: BLE001 - a rank already gone: nothing left to wait for
        pass


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dpo-xpu``; returns the exit code."""
    words = sys.argv[1:] if argv is None else argv
    args = build_parser(with_options="train" in words and ("-h" in words or "--help" in words)).parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except DpoXpuError as exc:
        from dpo_xpu.distributed import is_main_process, raised_by_all_ranks

        if is_main_process() or not raised_by_all_ranks(exc):  # rank 0's error, raised on every rank: said once
            print(f"dpo-xpu: error: {exc}", file=sys.stderr, flush=True)
        if raised_by_all_ranks(exc):
            _leave_together()
        return 2
    except KeyboardInterrupt:
        print("dpo-xpu: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
