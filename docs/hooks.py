"""MkDocs hooks of the dpo_xpu site: the parts of the docs that are generated at build time.

Nothing is written into ``docs/``: generated pages and pictures are added to the build as virtual files
(``File.generated``), and notebook copies are written under ``.cache/docs/`` (git-ignored), so a build never
dirties the work tree and a page never goes stale.

- Notebooks: one page per ``notebooks/*.ipynb``. :func:`select_notebook` picks the executed copy that
  ``make demo`` left in ``runs/demo/notebooks/`` when it ran to the end and its cells are the committed
  notebook's, else the committed notebook, unexecuted; each page opens with a box that says which it shows and
  why. Widget state and widget views are stripped from the copy, because rendering them loads JavaScript from a
  CDN. ``python docs/hooks.py --demo-current`` exits 1 when any page would show an unexecuted copy (``make
  docs`` then runs the demo first).
- API reference: one page per step of the data flow (:data:`API_GROUPS`), holding every public module of that
  step, found on disk (a module added later lands on its step's page without any change here; :data:`API_ORDER`
  only sets the order within a page).
- ``assets/reward_curves.png``: the demo run's picture when ``runs/demo/reward_curves.png`` exists, else drawn
  by :func:`dpo_xpu.outputs.plotting.plot_reward_curves` from the committed ``docs/assets/demo_metrics.jsonl``.
  The Results page's evaluation and samples come from the same place (``runs/demo/evaluation.json`` and
  ``samples.jsonl``, else the committed ``docs/assets/demo_evaluation.json`` and ``demo_samples.jsonl``, all
  three from one ``make demo`` run).
- The recipe options table, from the metadata of :class:`dpo_xpu.recipes.Recipe`'s fields
  (:func:`dpo_xpu.recipes.options_table`), where each key is declared once with its unit, meaning and source.
- The hardware table: the memory planner's estimate (:func:`dpo_xpu.train.memory.recipe_fits`) for every shipped GPU
  recipe, from the shapes in :data:`MODEL_SHAPES`.
- Math: ``pymdownx.arithmatex`` (generic mode) marks TeX in the pages, and notebooks keep ``$...$`` in their
  prose; this hook turns both into MathML, which browsers render natively: no MathJax, nothing fetched at run
  time. (mkdocs-jupyter still writes an empty MathJax ``<script src="">``, which loads nothing.)
"""

from __future__ import annotations

import dataclasses
import html
import json
import logging
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

log = logging.getLogger("mkdocs.hooks.dpo_xpu")

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
NOTEBOOKS = ROOT / "notebooks"
#: The demo run whose picture, evaluation and executed notebooks the site shows (``DPO_XPU_DOCS_DEMO_RUN``
#: overrides it).
DEMO_RUN = Path(os.environ.get("DPO_XPU_DOCS_DEMO_RUN") or ROOT / "runs" / "demo").resolve()
EXECUTED_NOTEBOOKS = DEMO_RUN / "notebooks"
CACHE = ROOT / ".cache" / "docs"
ASSETS = DOCS / "assets"
COMMITTED_METRICS = ASSETS / "demo_metrics.jsonl"
CURVES_URI = "assets/reward_curves.png"

#: The API reference, one page per step of the data flow: (page, nav title, what the step does, the modules of
#: the step). A name ending in ``.`` takes the package and every module under it; a module no step names goes
#: to the last page.
API_GROUPS: list[tuple[str, str, str, tuple[str, ...]]] = [
    (
        "recipe",
        "Recipe",
        "The recipe: dpo_xpu's keys, TRL's options, their values and files.",
        ("recipes", "recipe_values", "recipe_files"),
    ),
    (
        "environment",
        "Environment",
        "Where the run happens: the device, the stack's versions and verdicts.",
        ("environment", "device", "log_filters"),
    ),
    ("data", "Data", "Preference pairs: reading, validating, formatting, mixing, lengths, truncation.", ("data.",)),
    ("models", "Models", "Tokenizer, NF4 policy with LoRA, reference; the backends; hub checks.", ("models.", "hub")),
    (
        "train",
        "Training",
        "Recipe -> DPOConfig, the reference plan, the trainer, its losses, memory planner and step-0 check.",
        ("train.",),
    ),
    ("callbacks", "Callbacks", "Metrics, live curves, checkpoints, signals.", ("callbacks.",)),
    (
        "outputs-eval",
        "Outputs and evaluation",
        "What a run leaves on disk, and what comes after training: held-out evaluation, samples, export.",
        ("outputs.", "eval.", "files"),
    ),
    (
        "pipeline-cli",
        "Pipeline and command line",
        "The steps in order (run_training), several devices, the dpo-xpu command, the demo model, the errors.",
        ("pipeline", "finished_run", "distributed", "launch", "cli", "demo", "errors"),
    ),
]

#: The order of the modules within their API page: those listed here first, in this order, then any other
#: module alphabetically.
API_ORDER = [
    "recipes",
    "recipe_values",
    "recipe_files",
    "environment",
    "device",
    "data",
    "data.preferences",
    "data.rows",
    "data.sources",
    "data.lengths",
    "data.truncation",
    "models",
    "models.loading",
    "models.base",
    "models.gguf",
    "models.backends",
    "models.backends.native",
    "models.backends.ipex_llm",
    "models.backends.ipex_llm_config",
    "models.backends.ipex_llm_trainer",
    "train",
    "train.trl_config",
    "train.factory",
    "train.reference",
    "train.trainer",
    "train.losses",
    "train.prefix_sharing",
    "train.packing",
    "train.reference_cache",
    "train.trl_internals",
    "train.memory",
    "train.step0",
    "callbacks",
    "callbacks.metrics",
    "callbacks.checkpoints",
    "callbacks.interrupts",
    "outputs",
    "outputs.run_folder",
    "outputs.adapter",
    "outputs.fingerprints",
    "outputs.plotting",
    "outputs.model_card",
    "outputs.merge",
    "eval",
    "eval.heldout",
    "pipeline",
    "finished_run",
    "distributed",
    "launch",
    "cli",
    "demo",
    "errors",
]

#: The shapes the memory planner needs, of the models the shipped GPU recipes train (from each model's
#: ``config.json`` on the Hugging Face Hub; the site is built offline, so they are written here).
MODEL_SHAPES: dict[str, dict[str, Any]] = {
    "Qwen/Qwen2.5-1.5B-Instruct": {
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    },
    "teknium/OpenHermes-2.5-Mistral-7B": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 32002,
        "tie_word_embeddings": False,
    },
}
#: GPU memory sizes of the hardware table (GiB) and a card of each size.
GPU_SIZES = [(12, "Arc B580"), (16, "Arc A770"), (24, "Arc Pro B60"), (48, "Max 1100"), (64, "Max 1550, one stack")]

_state: dict[str, Any] = {}


def _title(stem: str) -> str:
    """``03_dpo_training`` -> ``03 dpo training`` (used only when a notebook has no heading)."""
    return stem.replace("_", " ")


@dataclasses.dataclass
class NotebookSource:
    """The notebook a page shows: ``path`` (the executed copy or the committed notebook), ``executed``, and
    ``note``, one sentence (Markdown) saying what the page shows and, for a committed copy, why."""

    name: str
    path: Path
    executed: bool
    note: str


def _cell_sources(nb: dict[str, Any]) -> list[tuple[str, str]]:
    """(type, source) of each cell, without the cell papermill adds for the injected parameters."""
    out = []
    for cell in nb.get("cells", []):
        if "injected-parameters" in (cell.get("metadata", {}).get("tags") or []):
            continue
        source = cell.get("source", "")
        out.append((cell.get("cell_type", ""), "".join(source) if isinstance(source, list) else source))
    return out


def select_notebook(committed: Path, executed_dir: Path) -> NotebookSource:
    """The copy of ``committed`` that its page shows: the executed one in ``executed_dir`` (same file name) when
    it ran to the end (papermill recorded no exception) and holds the committed notebook's cells, else
    ``committed`` itself, unexecuted, with the reason."""
    executed = executed_dir / committed.name
    run = "run `make demo` (or `make docs`, which runs it when needed) to show its outputs"
    if not executed.is_file():
        return NotebookSource(committed.name, committed, False, f"no executed copy in the demo run: {run}")
    try:
        nb = json.loads(executed.read_text(encoding="utf-8"))
        mine = json.loads(committed.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return NotebookSource(committed.name, committed, False, f"the executed copy is unreadable ({exc}): {run}")
    papermill = nb.get("metadata", {}).get("papermill") or {}
    if papermill.get("exception"):
        return NotebookSource(committed.name, committed, False, f"the demo run stopped at an error in it: {run}")
    if _cell_sources(nb) != _cell_sources(mine):
        return NotebookSource(
            committed.name, committed, False, f"the demo run executed an older version of this notebook: {run}"
        )
    if not papermill:
        return NotebookSource(committed.name, executed, True, f"as executed in `{_shown(executed)}`")
    when = str(papermill.get("end_time") or "")[:10]
    params = papermill.get("parameters") or {}
    how = ", ".join(f"`{k} = {json.dumps(v)}`" for k, v in params.items()) or "its default parameters"
    note = f"executed by papermill{' on ' + when if when else ''} with {how}"
    if str(params.get("recipe_file", "")).endswith("cpu_demo.yaml"):
        note += (
            " (`make demo`: SmolLM2-135M-Instruct and the shipped sample, on CPU; the outputs show the "
            "mechanics, not a good model)"
        )
    return NotebookSource(committed.name, executed, True, note)


def notebook_sources(executed_dir: Path | None = None) -> list[NotebookSource]:
    """What each ``notebooks/*.ipynb`` page shows (:func:`select_notebook`), in file-name order."""
    folder = EXECUTED_NOTEBOOKS if executed_dir is None else executed_dir
    return [select_notebook(committed, folder) for committed in sorted(NOTEBOOKS.glob("*.ipynb"))]


def _sanitized_copy(src: Path) -> Path:
    """Copy a notebook under ``.cache/docs/notebooks/`` without widget state and widget views."""
    nb = json.loads(src.read_text(encoding="utf-8"))
    nb.get("metadata", {}).pop("widgets", None)
    for cell in nb.get("cells", []):
        for output in cell.get("outputs", []) or []:
            data = output.get("data")
            if isinstance(data, dict):
                data.pop("application/vnd.jupyter.widget-view+json", None)
    dest = CACHE / "notebooks" / src.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(nb, indent=1, ensure_ascii=False)
    if not dest.exists() or dest.read_text(encoding="utf-8") != text:
        dest.write_text(text, encoding="utf-8")
    return dest


def _modules() -> list[str]:
    """Dotted names (relative to ``dpo_xpu``) of the package's public modules, in :data:`API_ORDER` first."""
    package = ROOT / "dpo_xpu"
    found = set()
    for path in package.rglob("*.py"):
        parts = path.relative_to(package).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts and not any(p.startswith("_") for p in parts) and "__pycache__" not in path.parts:
            found.add(".".join(parts))
    order = {name: i for i, name in enumerate(API_ORDER)}
    return sorted(found, key=lambda name: (order.get(name, len(order)), name))


def _group_of(module: str) -> str:
    for slug, _title, _what, members in API_GROUPS:
        for member in members:
            if module == member or (member.endswith(".") and (module + ".").startswith(member)):
                return slug
    return API_GROUPS[-1][0]


def api_groups() -> list[tuple[str, str, str, list[str]]]:
    """(page, nav title, what the step does, its modules) for each API page, in the order of the data flow."""
    modules = _modules()
    return [(slug, title, what, [m for m in modules if _group_of(m) == slug]) for slug, title, what, _ in API_GROUPS]


def api_page_of(module: str) -> str:
    """The API page (``api/<page>.md``) that documents ``dpo_xpu.<module>``."""
    return f"api/{_group_of(module)}.md"


def _first_line(module: str) -> str:
    path = ROOT / "dpo_xpu" / Path(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    import ast

    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    first = doc.strip().split("\n\n")[0].replace("\n", " ")
    first = re.sub(r":(?:class|func|data|meth|attr|mod|exc|obj):`~?([^`]+)`", r"`\1`", first)
    return first.replace("``", "`").replace("|", "\\|")


def _api_page(title: str, what: str, modules: list[str]) -> str:
    rows = ["| module | what it holds |", "|---|---|"]
    rows += [f"| [`dpo_xpu.{m}`](#dpo_xpu.{m}) | {_first_line(m)} |" for m in modules]
    parts = [f"# {title}\n\n{what}\n\n" + "\n".join(rows) + "\n"]
    for m in modules:
        # the module's own heading (h2, id dpo_xpu.<module>), its members under it (h3)
        parts.append(f"::: dpo_xpu.{m}\n    options:\n      show_root_heading: true\n      heading_level: 2\n")
    return "\n".join(parts)


def on_config(config: Any) -> Any:
    """Expand the nav's ``notebooks/index.md`` and ``api/index.md`` entries into sections."""
    notebooks = [f"notebooks/{s.name}" for s in notebook_sources()]
    api = [{title: f"api/{slug}.md"} for slug, title, _what, modules in api_groups() if modules]
    expansions = {
        "notebooks/index.md": [{"Overview": "notebooks/index.md"}, *notebooks],
        "api/index.md": [{"Overview": "api/index.md"}, *api],
    }
    nav = []
    for item in config["nav"] or []:
        if isinstance(item, dict) and len(item) == 1:
            ((title, target),) = item.items()
            if isinstance(target, str) and target in expansions:
                item = {title: expansions[target]}
        nav.append(item)
    config["nav"] = nav
    return config


def _demo_source(name: str, committed: Path) -> tuple[Path, bool]:
    """The demo run's ``name`` when the run left its picture and that file, else the committed copy; and
    whether it is the demo run's."""
    mine = DEMO_RUN / name
    if (DEMO_RUN / "reward_curves.png").is_file() and mine.is_file():
        return mine, True
    return committed, False


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


def _reward_curves_source() -> tuple[Path, str]:
    """The picture to show and a sentence saying where it comes from."""
    demo_png = DEMO_RUN / "reward_curves.png"
    if demo_png.is_file():
        return demo_png, f"`{_shown(demo_png)}`, left by `make demo` on the machine that built this site"
    from dpo_xpu.outputs.plotting import plot_reward_curves

    out = CACHE / "reward_curves.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_reward_curves(COMMITTED_METRICS, out_path=out)
    return out, (
        "`docs/assets/demo_metrics.jsonl`, the metrics of a reference `make demo` run committed with the docs "
        "(drawn with `plot_reward_curves`; run `make demo` before `make docs` to show your own run)"
    )


def _metrics_rows() -> list[dict[str, Any]]:
    path, _ = _demo_source("metrics.jsonl", COMMITTED_METRICS)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if "loss" in r]


@event_priority(100)  # before mkdocs-jupyter wraps notebook files
def on_files(files: Files, config: Any) -> Files:
    """Add the notebook pages, the API pages and the reward-curve picture."""
    sources = notebook_sources()
    for source in sources:
        _sanitized_copy(source.path)
        # A plain File rooted in the cache folder, not File.generated: mkdocs-jupyter's wrapper reads
        # abs_src_path through src_dir, which a generated file does not have.
        files.append(File(f"notebooks/{source.name}", str(CACHE), config["site_dir"], config["use_directory_urls"]))
        if not source.executed:
            log.info("notebook page %s shows the committed notebook: %s", source.name, source.note)
    _state["notebooks"] = sources
    for slug, title, what, modules in api_groups():
        if modules:
            files.append(File.generated(config, f"api/{slug}.md", content=_api_page(title, what, modules)))
    picture, source = _reward_curves_source()
    files.append(File.generated(config, CURVES_URI, abs_src_path=str(picture)))
    _state["curves_source"] = source
    return files


def _options_table() -> str:
    from dpo_xpu.recipes import options_table

    return options_table(full=True)


def _recipe_header(path: Path) -> str:
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return " ".join(lines)


def _recipes_shipped() -> str:
    import yaml

    from dpo_xpu.recipes import Recipe, recipe_keys

    recipes = sorted((ROOT / "recipes").glob("*.yaml"))
    parts = []
    for path in recipes:
        parts.append(f"### `recipes/{path.name}`\n\n{_recipe_header(path) or '(no description)'}\n")
    defaults = {**Recipe().to_dict(), "trl_options": {}}
    values = {p.name: yaml.safe_load(p.read_text(encoding="utf-8")) or {} for p in recipes}
    header = "| key | default | " + " | ".join(f"`{name}`" for name in values) + " |"
    rows = [header, "|---" * (len(values) + 2) + "|"]
    for key in recipe_keys():

        def show(v: Any) -> str:
            if isinstance(v, list):
                return "[" + ", ".join(map(str, v)) + "]"
            return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)

        cells = [show(vals[key]) if key in vals else "·" for vals in values.values()]
        rows.append(f"| `{key}` | {show(defaults[key])} | " + " | ".join(cells) + " |")
    parts.append("### Values side by side\n\n`·`: the recipe leaves the key at its default.\n\n" + "\n".join(rows))
    return "\n".join(parts)


def recipe_estimates() -> list[dict[str, Any]]:
    """The memory planner's verdict for each shipped recipe whose model is in :data:`MODEL_SHAPES`: ``recipe``
    (file name), the recipe, its ``estimate`` (:class:`dpo_xpu.train.memory.MemoryEstimate`) and ``fits``, a dict of
    GiB -> bool for :data:`GPU_SIZES`."""
    from dpo_xpu.recipes import load_recipe
    from dpo_xpu.train.memory import recipe_fits

    out = []
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        recipe = load_recipe(path)
        shape = MODEL_SHAPES.get(recipe.model_name_or_path)
        if shape is None:
            continue
        verdicts = {gib: recipe_fits(recipe, gib * 1024, config=shape) for gib, _card in GPU_SIZES}
        first = next(iter(verdicts.values()))
        fits = {gib: v.fits for gib, v in verdicts.items()}
        out.append({"recipe": path.name, "config": recipe, "estimate": first.estimate, "fits": fits})
    return out


def _hardware_table() -> str:
    from dpo_xpu.train.memory import FIT_FRACTION

    head = "| recipe | model | backend, reference | pairs x tokens | LoRA r | planned peak | largest allocation | "
    head += " | ".join(f"{gib} GiB" for gib, _ in GPU_SIZES) + " |"
    rows = [head, "|---" * (7 + len(GPU_SIZES)) + "|"]
    for item in recipe_estimates():
        r, est = item["config"], item["estimate"]
        reference = est.settings.get("reference", r.reference)
        marks = " | ".join("yes" if item["fits"][gib] else "no" for gib, _ in GPU_SIZES)
        rows.append(
            f"| `{item['recipe']}` | {r.model_name_or_path.split('/')[-1]} | {r.backend}, {reference} | "
            f"{r.per_device_train_batch_size} x {r.max_length} | {r.lora_r} | {est.total_mib / 1024:.1f} GiB | "
            f"{est.largest_allocation_mib:,.0f} MiB ({est.largest_allocation}) | {marks} |"
        )
    cards = ", ".join(f"{gib} GiB: {card}" for gib, card in GPU_SIZES)
    return (
        "\n".join(rows)
        + f'\n\n"yes": the planned peak is within {FIT_FRACTION:.0%} of the memory (the rest is left to the '
        f"allocator and the runtime). Cards of each size: {cards}."
    )


def _curves_numbers() -> str:
    rows = _metrics_rows()
    if not rows:
        return "(no logged steps)"
    picks = [rows[0], rows[min(len(rows) - 1, len(rows) // 3)], rows[-1]]
    out = ["| step | learning rate | loss | accuracy | margin | chosen | rejected |", "|---|---|---|---|---|---|---|"]
    for r in picks:
        out.append(
            f"| {r['step']} | {r.get('learning_rate', float('nan')):.2e} | {r['loss']:.4f} | "
            f"{r.get('rewards/accuracies', float('nan')):.2f} | {r.get('rewards/margins', float('nan')):.4f} | "
            f"{r.get('rewards/chosen', float('nan')):.4f} | {r.get('rewards/rejected', float('nan')):.4f} |"
        )
    return "\n".join(out)


def _source_sentence(path: Path, from_run: bool) -> str:
    if from_run:
        return f"From `{_shown(path)}`, left by `make demo` on the machine that built this site."
    return (
        f"From `{_shown(path)}`, committed with the docs from the same reference `make demo` run as the curves "
        "above (run `make demo` before `make docs` to show your own run)."
    )


_EVAL_ROWS = [
    ("n_pairs", "held-out pairs", "{:d}", "pairs never trained on (`eval_fraction` of the rows)"),
    ("reward_accuracy", "reward accuracy", "{:.2f}", "share of pairs whose chosen reward is the larger"),
    ("mean_margin", "mean reward margin", "{:.4f}", "chosen minus rejected reward, nats x beta"),
    ("mean_chosen_reward", "mean chosen reward", "{:.4f}", "beta x (policy - reference) log-prob of the chosen answer"),
    ("mean_rejected_reward", "mean rejected reward", "{:.4f}", "the same for the rejected answer"),
    ("drift_chosen_logratio", "drift", "{:.4f}", "mean policy - reference log-prob of the chosen answers, nats"),
    ("samples_differ", "samples that differ", "{:d}", "prompts whose greedy policy answer is not the reference's"),
]


def _eval_table() -> str:
    path, from_run = _demo_source("evaluation.json", ASSETS / "demo_evaluation.json")
    data = json.loads(path.read_text(encoding="utf-8"))
    rows = ["| figure | value | what it is |", "|---|---|---|"]
    for key, label, fmt, what in _EVAL_ROWS:
        value = data.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        shown = str(value) if fmt == "{:d}" and isinstance(value, float) else fmt.format(value)
        if key == "samples_differ" and isinstance(data.get("n_samples"), int):
            shown += f" of {data['n_samples']}"
        rows.append(f"| {label} (`{key}`) | {shown} | {what} |")
    merge = data.get("merge") or {}
    if merge:
        verdict = "matches" if merge.get("matches") else "does not match"
        rows.append(
            f"| merged export (`merge`) | {verdict} | the merged {merge.get('weights_dtype', '')} model against the "
            f"adapter: largest logit difference {merge.get('max_abs_diff', float('nan')):.2g}, "
            f"{merge.get('greedy_same', '?')} of {merge.get('greedy_texts', '?')} greedy texts the same |"
        )
    return "\n".join(rows) + "\n\n" + _source_sentence(path, from_run)


def _visible(text: str, limit: int) -> str:
    """``text`` with control characters shown as ``\\xNN`` and cut to ``limit`` characters."""
    text = "".join(c if c.isprintable() or c == "\n" else f"\\x{ord(c):02x}" for c in text)
    return text if len(text) <= limit else text[:limit] + " [...]"


def _wrapped(text: str, width: int = 96) -> str:
    """Each line of ``text`` wrapped at ``width`` characters (long prompts fit the page without scrolling)."""
    import textwrap

    return "\n".join(textwrap.fill(line, width) if line else line for line in text.split("\n"))


def _samples() -> str:
    path, from_run = _demo_source("samples.jsonl", ASSETS / "demo_samples.jsonl")
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    parts = []
    for i, sample in enumerate(lines[:3], 1):
        block = [
            f"**Prompt {i}** (ChatML, as the model sees it)",
            "",
            "```text",
            _wrapped(_visible(str(sample.get("prompt", "")), 400).rstrip("\n")),
            "```",
            "",
            "| | answer (greedy) |",
            "|---|---|",
        ]
        for who in ("policy", "reference"):
            answer = _visible(str(sample.get(who, "")), 200).replace("\n", " ").replace("|", "\\|")
            block.append(f"| {who} | `{answer}` |" if answer.strip() else f'| {who} | `""` (empty) |')
        parts.append("\n".join(block))
    shown = f"{min(3, len(lines))} of {len(lines)} prompts. "
    return "\n\n".join(parts) + "\n\n" + shown + _source_sentence(path, from_run)


def _notebook_list() -> str:
    items = _state.get("notebooks") or notebook_sources()
    if not items:
        return "No notebooks are in `notebooks/` yet."
    lines = []
    for s in items:
        how = s.note if s.executed else f"as committed, without outputs: {s.note}"
        lines.append(f"- [{_title(Path(s.name).stem)}]({s.name}): {how}")
    return "\n".join(lines)


def _api_index() -> str:
    import griffe

    import dpo_xpu

    package = griffe.load("dpo_xpu", search_paths=[str(ROOT)], resolve_aliases=False)
    groups = api_groups()
    order = {m: i for i, m in enumerate(m for _s, _t, _w, modules in groups for m in modules)}
    titles = {slug: title for slug, title, _w, _m in groups}
    flow = ["| step | page | modules |", "|---|---|---|"]
    for i, (slug, title, what, modules) in enumerate(groups, 1):
        if modules:
            names = ", ".join(f"`{m}`" for m in modules)
            flow.append(f"| {i} | [{title}]({slug}.md): {what} | {names} |")
    rows = ["| name | step | what it is |", "|---|---|---|"]
    for name, module in sorted(dpo_xpu._EXPORTS.items(), key=lambda kv: (order.get(kv[1], 99), kv[0])):
        obj = package[module].members.get(name)
        doc = obj.docstring.value if obj is not None and obj.docstring else ""
        summary = doc.strip().split("\n\n")[0].replace("\n", " ").replace("|", "\\|")
        page = api_page_of(module)[len("api/") :]
        group = titles[page[: -len(".md")]]
        rows.append(f"| [`{name}`][dpo_xpu.{module}.{name}] | [{group}]({page}#dpo_xpu.{module}) | {summary} |")
    return "\n".join(flow) + "\n\n## Public names\n\n" + "\n".join(rows)


PLACEHOLDERS = {
    "<!-- dpo-xpu:recipe-options -->": _options_table,
    "<!-- dpo-xpu:recipes-shipped -->": _recipes_shipped,
    "<!-- dpo-xpu:curves-source -->": lambda: _state.get("curves_source", ""),
    "<!-- dpo-xpu:curves-numbers -->": _curves_numbers,
    "<!-- dpo-xpu:eval-table -->": _eval_table,
    "<!-- dpo-xpu:samples -->": _samples,
    "<!-- dpo-xpu:hardware-table -->": _hardware_table,
    "<!-- dpo-xpu:notebook-list -->": _notebook_list,
    "<!-- dpo-xpu:api-index -->": _api_index,
}


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    """Fill the ``<!-- dpo-xpu:... -->`` placeholders with generated Markdown."""
    for marker, make in PLACEHOLDERS.items():
        if marker in markdown:
            markdown = markdown.replace(marker, make())
    return markdown


_MATH = re.compile(r'<(div|span) class="arithmatex">\\[\[(](.*?)\\[\])]</\1>', re.S)
#: Parts of a rendered notebook where a dollar sign is not math: code, preformatted outputs, scripts, styles.
_NOT_PROSE = re.compile(r"(<(pre|code|script|style)\b.*?</\2>)", re.S)
_NB_DISPLAY = re.compile(r"\$\$(.+?)\$\$", re.S)
_NB_INLINE = re.compile(r"(?<![\\$\w])\$(?=\S)([^$<>]+?)(?<=\S)\$(?![\w$])")
#: Sphinx roles in docstrings (``:func:`x` `` renders as ``:func:<code>x</code>``): keep the name only.
_ROLE = re.compile(r":(?:class|func|data|meth|attr|mod|exc|obj):<code>~?(?:[\w.]*\.)?([\w]+)</code>")


def _mathml(tex: str, display: str) -> str | None:
    from latex2mathml.converter import convert

    try:
        return convert(html.unescape(tex).strip(), display=display)
    except Exception as exc:  # leave the TeX as it was rather than fail the page
        log.info("could not convert TeX to MathML (%s): %.60s", exc, tex)
        return None


def _notebook_math(text: str) -> str:
    """Convert ``$$...$$`` and ``$...$`` in a rendered notebook's prose (never in code or outputs)."""

    def block(match: re.Match) -> str:
        mathml = _mathml(match.group(1), "block")
        return match.group(0) if mathml is None else f'<div class="arithmatex">{mathml}</div>'

    def inline(match: re.Match) -> str:
        mathml = _mathml(match.group(1), "inline")
        return match.group(0) if mathml is None else f'<span class="arithmatex">{mathml}</span>'

    parts = _NOT_PROSE.split(text)
    out = []
    # split() with two groups yields: prose, whole match, tag name, prose, ...
    for i in range(0, len(parts), 3):
        prose = _NB_INLINE.sub(inline, _NB_DISPLAY.sub(block, parts[i]))
        out.append(prose)
        if i + 1 < len(parts):
            out.append(parts[i + 1])
    return "".join(out)


def on_page_content(html_text: str, page: Any, config: Any, files: Files) -> str:
    """TeX -> MathML (rendered by the browser, nothing loaded), and Sphinx roles -> plain code names."""

    def to_mathml(match: re.Match) -> str:
        tag = match.group(1)
        mathml = _mathml(match.group(2), "block" if tag == "div" else "inline")
        return match.group(0) if mathml is None else f'<{tag} class="arithmatex">{mathml}</{tag}>'

    html_text = _MATH.sub(to_mathml, html_text)
    if page.file.src_uri.startswith("notebooks/") and page.file.src_uri.endswith(".ipynb"):
        html_text = _notebook_banner(_notebook_math(html_text), page.file.src_uri[len("notebooks/") :])
    return _keep_table_code_whole(_ROLE.sub(r"<code>\1</code>", html_text))


_TABLE = re.compile(r"<table\b.*?</table>", re.S)
_ONE_WORD_CODE = re.compile(r"<code>([^<\s]+)</code>")


def _keep_table_code_whole(html_text: str) -> str:
    """Mark the code spans of tables that hold no space (an option name, a value, a file name, ``--resume``)
    ``nowrap``: the browser would otherwise break them at a hyphen or, in Material, anywhere."""
    return _TABLE.sub(lambda m: _ONE_WORD_CODE.sub(r'<code class="nowrap">\1</code>', m.group(0)), html_text)


def _inline_html(markdown: str) -> str:
    """Code spans of a one-sentence note as HTML (the note is inserted into a rendered page)."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(markdown, quote=False))


def _notebook_banner(html_text: str, name: str) -> str:
    """Put a box under the notebook page's first heading saying whether it shows executed outputs."""
    source = next((s for s in _state.get("notebooks") or notebook_sources() if s.name == name), None)
    if source is None:
        return html_text
    if source.executed:
        kind, title, body = "success", "Executed outputs", f"This page shows the notebook {source.note}."
    else:
        kind, title = "warning", "Not executed: no outputs on this page"
        body = f"This page shows the notebook as committed, without outputs: {source.note}."
    box = (
        f'<div class="admonition {kind} notebook-status" id="notebook-status"><p class="admonition-title">{title}</p>'
        f"<p>{_inline_html(body)}</p></div>"
    )
    end = html_text.find("</h1>")
    if end < 0:
        return box + html_text
    at = end + len("</h1>")
    return html_text[:at] + box + html_text[at:]


def on_post_build(config: Any) -> None:
    """Drop the notebook copies of notebooks that no longer exist (the cache stays small)."""
    keep = {s.path.name for s in notebook_sources()}
    folder = CACHE / "notebooks"
    for stale in folder.glob("*.ipynb") if folder.is_dir() else []:
        if stale.name not in keep:
            stale.unlink()
    if not keep and folder.is_dir():
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str]) -> int:
    """``python docs/hooks.py --demo-current``: exit 0 when every notebook page would show executed outputs, else
    print why not (one line per notebook) and exit 1. ``make docs`` runs the demo first when it fails."""
    if argv != ["--demo-current"]:
        print("usage: python docs/hooks.py --demo-current", file=sys.stderr)
        return 2
    stale = [s for s in notebook_sources() if not s.executed]
    for s in stale:
        print(f"{s.name}: {s.note}")
    return 1 if stale else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
