"""The ``dpo-xpu`` command line.

    dpo-xpu env [--json] [--backend native|ipex-llm] [--recipe FILE]   # report; exit 1 on an error verdict
    dpo-xpu train --recipe FILE [--set key=value ...] [--overwrite | --resume]
    dpo-xpu plot RUN_DIR                                  # redraw RUN_DIR/reward_curves.png
    dpo-xpu evaluate RUN_DIR [--split eval|train] [--max-eval-pairs N] [--num-eval-samples N] ...  # evaluation.json
    dpo-xpu export RUN_DIR [--merged] [--out DIR] [--overwrite]  # RUN_DIR/merged and merge_check.json
    dpo-xpu demo-model [DEST]                             # build the offline demo's tiny model

Errors a user can cause print one line (``dpo-xpu: error: ...``) and exit 2, without a traceback.
Heavy imports happen inside the commands, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
import textwrap
from pathlib import Path

from dpo_xpu.errors import DpoXpuError


def _cmd_env(args: argparse.Namespace) -> int:
    from dpo_xpu.environment import check_environment
    from dpo_xpu.recipes import load_recipe

    recipe = load_recipe(args.recipe, overrides=args.set) if args.recipe or args.set else None  # --set: over defaults
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
            f"  last step {last.get('step', '?')}: loss {_number(last.get('loss'), '.4f')}, "
            f"accuracy {_number(last.get('rewards/accuracies'), '.2f')}, "
            f"margin {_number(last.get('rewards/margins'), '.4f')}"
        )
    return 0


def _number(value: object, spec: str) -> str:
    """``value`` formatted with ``spec`` when it is a number; as it is (``nan`` as metrics.jsonl writes it), or
    ``n/a`` when missing, otherwise."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, spec)
    return "n/a" if value is None else str(value)


def _cmd_plot(args: argparse.Namespace) -> int:
    from dpo_xpu.outputs.plotting import CURVES_FILE, METRICS_FILE, plot_reward_curves, read_metrics

    run_dir = Path(args.run_dir)
    if not (run_dir / METRICS_FILE).is_file():
        raise DpoXpuError(f"{run_dir / METRICS_FILE} does not exist: give a run folder written by 'dpo-xpu train'")
    rows = read_metrics(run_dir)
    if not rows:
        raise DpoXpuError(
            f"{run_dir / METRICS_FILE} holds no metric rows (JSON objects with a step): nothing to draw, and "
            f"{CURVES_FILE} is left as it is. Fix: give the folder of a run that trained at least one logged step"
        )
    out = run_dir / CURVES_FILE
    plot_reward_curves(rows, out_path=out)
    print(out)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from dpo_xpu.finished_run import evaluate_run

    keys = ("max_eval_pairs", "num_eval_samples", "max_new_tokens", "batch_size", "device", "split")
    evaluation = evaluate_run(args.run_dir, **{key: getattr(args, key) for key in keys})
    print(evaluation.summary())
    if evaluation.samples:
        print(evaluation.comparison())
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from dpo_xpu.finished_run import export_run

    exported = export_run(args.run_dir, merged=args.merged, out_dir=args.out, overwrite=args.overwrite)
    print(exported.summary())
    return 0 if exported.matches else 1


def _cmd_demo_model(args: argparse.Namespace) -> int:
    from dpo_xpu.demo import build_demo_model

    print(build_demo_model(args.dest, force=args.force))
    return 0


def _sentence(text: str) -> str:
    """The first sentence of ``text``, whole (an abbreviation such as "et al." or "e.g." ends none)."""
    text = " ".join(text.split())
    for match in re.finditer(r"[.!?](?=\s+[A-Z(`])", text):
        if not re.search(r"(\bal|\be\.g|\bi\.e|\bcf|\bvs|\betc|\bEq|\bSec|\bNo)$", text[: match.start()]):
            return text[: match.end()]
    return text


def _wrapped(head: str, text: str, width: int = 100) -> list[str]:
    """``head: text`` wrapped at ``width``, continuation lines indented under the text (nothing cut)."""
    return textwrap.wrap(f"{head}: {text}" if text else head, width=width, subsequent_indent=" " * 6)


def _plain(markdown: str) -> str:
    """The docs' Markdown as terminal text: no code backticks, no escaped pipes, links as their text."""
    return re.sub(r"\[([^\]]+)\]\([^)]+\)", r"\1", markdown.replace("\\|", "|").replace("`", ""))


#: transformers' TrainingArguments options by topic, for ``dpo-xpu train --help`` (a name's first match wins).
TRL_OPTION_TOPICS = (
    ("optimizer and schedule", ("optim", "adam", "weight_decay", "lr_", "warmup", "max_grad_norm", "learning")),
    ("logging", ("log", "report_to", "run_name", "disable_tqdm", "include_", "project", "trackio")),
    ("saving and the hub", ("save", "output", "overwrite", "push", "hub", "resume", "restore")),
    ("evaluation", ("eval", "metric", "greater_is", "prediction", "batch_eval", "load_best", "per_device_eval")),
    (
        "devices and precision",
        ("bf16", "fp16", "tf32", "half", "cpu", "device", "ddp", "fsdp", "deepspeed", "accelerator"),
    ),
    ("data loading", ("dataloader", "data_seed", "group_by", "length_column", "remove_unused", "dataset", "padding")),
    ("compilation and memory", ("torch_compile", "torch_empty", "gradient_checkpointing", "auto_find", "liger")),
)


def _train_epilog() -> str:
    """The recipe keys for ``dpo-xpu train --help``: dpo_xpu's own by topic (:data:`dpo_xpu.recipe_values.KEY_TOPICS`;
    default, unit and the whole meaning from the Recipe's field metadata, TRL's default where it differs), then the
    installed TRL's options: its DPO options, then transformers' by topic (:data:`TRL_OPTION_TOPICS`), each with
    its default and the first sentence of its help, never cut."""
    import dataclasses

    import trl
    from transformers import TrainingArguments
    from trl import DPOConfig

    from dpo_xpu.recipe_values import KEY_TOPICS, TRL_DEFAULT_OVERRIDES
    from dpo_xpu.recipes import key_docs, trl_default_differences, trl_option_names

    differs, docs = trl_default_differences(), key_docs()
    lines = ["dpo_xpu's recipe keys (default [unit]: meaning; docs/options.md has the sources):"]
    for topic, keys in KEY_TOPICS:
        lines += ["", f"  {topic}:"]
        for key in keys:
            doc = docs[key]
            trl_default = f" (TRL's default: {differs[key][1]!r})" if key in differs else ""
            lines += _wrapped(
                f"    {key} = {doc['default']!r}{trl_default} [{_plain(doc['unit'])}]", _plain(doc["help"])
            )
    helps = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(DPOConfig)}
    transformers_names = {f.name for f in dataclasses.fields(TrainingArguments)}
    groups: dict[str, list[str]] = {t: [] for t in ("DPO (TRL's own)", *dict(TRL_OPTION_TOPICS), "other")}
    for name, default in sorted(trl_option_names().items()):
        ours, why = TRL_DEFAULT_OVERRIDES.get(name, (default, ""))
        head = f"    {name} = {ours!r}" + (f" (TRL's default: {default!r})" if name in TRL_DEFAULT_OVERRIDES else "")
        topics = [t for t, words in TRL_OPTION_TOPICS if any(w in name for w in words)] + ["other"]
        groups[topics[0] if name in transformers_names else "DPO (TRL's own)"] += _wrapped(
            head, f"{_sentence(helps.get(name, ''))} {why}".strip()
        )
    lines += [
        "",
        f"TRL {trl.__version__}'s DPOConfig options, under their own names (TRL's defaults, but where shown):",
    ]
    for topic, group in groups.items():
        if group:
            lines += ["", f"  {topic}:", *group]
    return "\n".join(lines)


def build_parser(with_options: bool = False) -> argparse.ArgumentParser:
    """The argument parser of ``dpo-xpu`` (sub-commands env, train, plot, evaluate, export, demo-model).

    Args:
        with_options: list every recipe key and TRL option in ``train --help`` (imports TRL, so only for help).
    """
    from dpo_xpu.recipe_values import BACKENDS

    parser = argparse.ArgumentParser(prog="dpo-xpu", description="DPO with NF4 + LoRA on Intel GPUs.")
    noise = parser.add_mutually_exclusive_group()
    noise.add_argument("-v", "--verbose", action="store_true", help="also log the libraries' INFO lines")
    noise.add_argument("-q", "--quiet", action="store_true", help="log dpo_xpu's warnings only, not its decisions")
    sub = parser.add_subparsers(dest="command", required=True)

    env = sub.add_parser("env", help="report the device, driver, oneAPI and package versions")
    env.add_argument("--json", action="store_true", help="print the report as JSON")
    env.add_argument("--backend", choices=BACKENDS)
    env.add_argument("--recipe", help="also say whether this recipe is expected to fit the device's memory")
    env.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key (of the defaults without --recipe)",
    )
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

    evaluate = sub.add_parser(
        "evaluate",
        help="evaluate a finished run: held-out reward accuracy, margin, drift; policy vs reference answers",
        description="Evaluate the run in RUN_DIR with its own recipe.yaml (the held-out rows as training split them) "
        "and its adapter; write RUN_DIR/evaluation.json and RUN_DIR/samples.jsonl.",
    )
    evaluate.add_argument("run_dir")
    evaluate.add_argument(
        "--split", choices=("eval", "train"), default="eval", help="the held-out rows (default) or the trained ones"
    )
    evaluate.add_argument("--max-eval-pairs", type=int, default=200, metavar="N", help="score at most N pairs")
    evaluate.add_argument("--num-eval-samples", type=int, metavar="N", help="prompts answered (default: the recipe's)")
    evaluate.add_argument("--max-new-tokens", type=int, metavar="N", help="tokens per answer (default: the recipe's)")
    evaluate.add_argument("--batch-size", type=int, default=4, metavar="N", help="sequences per forward pass")
    evaluate.add_argument("--device", help="auto, xpu, cuda or cpu (default: the recipe's)")
    evaluate.set_defaults(func=_cmd_evaluate)

    export = sub.add_parser(
        "export",
        help="export a finished run: its adapter, or --merged into the base (checked)",
        description="The adapter is in RUN_DIR/adapter; --merged merges it into an unquantized copy of the base, "
        "checks the merged model's logits and greedy text against the adapter model's (RUN_DIR/merge_check.json). "
        "Exit 1 when the check finds a difference.",
    )
    export.add_argument("run_dir")
    export.add_argument("--merged", action="store_true", help="merge the adapter into the base (no PEFT needed)")
    export.add_argument("--out", metavar="DIR", help="where the merged model (default RUN_DIR/merged) or adapter goes")
    export.add_argument("--overwrite", action="store_true", help="replace what --out (or RUN_DIR/merged) holds")
    export.set_defaults(func=_cmd_export)

    demo = sub.add_parser("demo-model", help="build the offline demo's tiny ChatML model")
    demo.add_argument("dest", nargs="?", default="runs/demo-model")
    demo.add_argument("--force", action="store_true", help="rebuild even if already built")
    demo.set_defaults(func=_cmd_demo_model)
    return parser


def _leave_together() -> None:
    """Under several processes, wait until every rank got here (rank 0 has said why they stop) before exiting:
    torchrun stops the other ranks as soon as one exits with an error, which would cut rank 0's last lines."""
    from dpo_xpu.distributed import barrier

    with contextlib.suppress(Exception):  # a rank already gone: nothing left to wait for
        barrier()


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dpo-xpu``; returns the exit code."""
    words = sys.argv[1:] if argv is None else argv
    args = build_parser(with_options="train" in words and ("-h" in words or "--help" in words)).parse_args(argv)
    # dpo_xpu's own lines at INFO (what `auto` chose, the reference cache, the time a run will take), the stack's
    # at WARNING; -v shows the stack's INFO too, -q dpo_xpu's warnings only
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("dpo_xpu").setLevel(logging.WARNING if args.quiet else logging.INFO)
    if not args.verbose:  # datasets' bars over each map TRL runs (tokenizing, adding EOS, ...): -v shows them
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
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
    except OSError as exc:  # the system refused a read or a write: permissions, a full disk, a read-only mount
        path = exc.filename2 or exc.filename  # a rename's target (atomic writes), else the path
        where = f": {path}" if path else ""
        print(
            f"dpo-xpu: error: {exc.strerror or exc}{where}. Fix: check that path's permissions and the free disk "
            "space, then run the command again",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
