"""MkDocs hooks of the dpo_xpu site: the parts of the docs that are generated at build time.

Nothing is written into ``docs/``: generated pages and pictures are added to the build as virtual files
(``File.generated``), and notebook copies are written under ``.cache/docs/`` (git-ignored), so a build never
dirties the work tree and a page never goes stale.

- Notebooks: one page per ``notebooks/*.ipynb``; the executed copy from ``runs/demo/notebooks/`` (left by
  ``make demo``) is rendered where it exists, else the committed notebook, unexecuted. Widget state and
  widget views are stripped from the copy, because rendering them loads JavaScript from a CDN.
- API reference: one page per public module of the package, found on disk (a module added later gets its page
  without any change here; :data:`API_ORDER` only sets the order).
- ``assets/reward_curves.png``: the demo run's picture when ``runs/demo/reward_curves.png`` exists, else drawn
  by :func:`dpo_xpu.outputs.plotting.plot_reward_curves` from the committed ``docs/assets/demo_metrics.jsonl``.
- The recipe options table, from the metadata of :class:`dpo_xpu.recipes.Recipe`'s fields
  (:func:`dpo_xpu.recipes.options_table`), where each key is declared once with its unit, meaning and source.
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
from pathlib import Path
from typing import Any

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

log = logging.getLogger("mkdocs.hooks.dpo_xpu")

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
NOTEBOOKS = ROOT / "notebooks"
#: The demo run whose picture and executed notebooks the site shows (``DPO_XPU_DOCS_DEMO_RUN`` overrides it).
DEMO_RUN = Path(os.environ.get("DPO_XPU_DOCS_DEMO_RUN") or ROOT / "runs" / "demo").resolve()
EXECUTED_NOTEBOOKS = DEMO_RUN / "notebooks"
CACHE = ROOT / ".cache" / "docs"
COMMITTED_METRICS = DOCS / "assets" / "demo_metrics.jsonl"
CURVES_URI = "assets/reward_curves.png"

#: The nav order of the API pages. Every module of the package gets a page: those listed here first, in this
#: order, when their file exists; any other module after them, alphabetically.
API_ORDER = [
    "recipes",
    "presets",
    "device",
    "environment",
    "memory",
    "data.preferences",
    "data.sources",
    "data.lengths",
    "data.truncation",
    "models.base",
    "models.loading",
    "models.gguf",
    "models.backends",
    "models.backends.native",
    "models.backends.ipex_llm",
    "models.backends.ipex_llm_config",
    "models.backends.ipex_llm_trainer",
    "train.trl_config",
    "train.reference",
    "train.trainer",
    "train.losses",
    "train.prefix_sharing",
    "train.reference_cache",
    "train.trl_internals",
    "callbacks.metrics",
    "callbacks.checkpoints",
    "callbacks.interrupts",
    "callbacks.step0",
    "outputs.run_folder",
    "outputs.plotting",
    "outputs.model_card",
    "eval.heldout",
    "eval.export",
    "distributed",
    "pipeline",
    "launch",
    "demo",
    "errors",
    "cli",
]

_state: dict[str, Any] = {}


def _title(stem: str) -> str:
    """``03_dpo_training`` -> ``03 dpo training`` (used only when a notebook has no heading)."""
    return stem.replace("_", " ")


def _notebook_sources() -> list[tuple[Path, bool]]:
    """Each committed notebook, as (path to render, executed?): the executed copy where ``make demo`` left one."""
    out = []
    for committed in sorted(NOTEBOOKS.glob("*.ipynb")):
        executed = EXECUTED_NOTEBOOKS / committed.name
        out.append((executed, True) if executed.is_file() else (committed, False))
    return out


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


def _api_pages() -> list[str]:
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


def on_config(config: Any) -> Any:
    """Expand the nav's ``notebooks/index.md`` and ``api/index.md`` entries into sections."""
    notebooks = [f"notebooks/{p.name}" for p, _ in _notebook_sources()]
    api = [f"api/{name}.md" for name in _api_pages()]
    expansions = {"notebooks/index.md": ["notebooks/index.md", *notebooks], "api/index.md": ["api/index.md", *api]}
    nav = []
    for item in config["nav"] or []:
        if isinstance(item, dict) and len(item) == 1:
            ((title, target),) = item.items()
            if isinstance(target, str) and target in expansions:
                item = {title: expansions[target]}
        nav.append(item)
    config["nav"] = nav
    return config


def _reward_curves_source() -> tuple[Path, str]:
    """The picture to show and a sentence saying where it comes from."""
    demo_png = DEMO_RUN / "reward_curves.png"
    if demo_png.is_file():
        shown = demo_png.relative_to(ROOT) if demo_png.is_relative_to(ROOT) else demo_png
        return demo_png, f"`{shown}`, left by `make demo` on the machine that built this site"
    from dpo_xpu.outputs.plotting import plot_reward_curves

    out = CACHE / "reward_curves.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_reward_curves(COMMITTED_METRICS, out_path=out)
    return out, (
        "`docs/assets/demo_metrics.jsonl`, the metrics of a reference `make demo` run committed with the docs "
        "(drawn with `plot_reward_curves`; run `make demo` before `make docs` to show your own run)"
    )


def _metrics_rows() -> list[dict[str, Any]]:
    path = DEMO_RUN / "metrics.jsonl"
    if not (DEMO_RUN / "reward_curves.png").is_file() or not path.is_file():
        path = COMMITTED_METRICS
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if "loss" in r]


@event_priority(100)  # before mkdocs-jupyter wraps notebook files
def on_files(files: Files, config: Any) -> Files:
    """Add the notebook pages, the API pages and the reward-curve picture."""
    for src, _executed in _notebook_sources():
        _sanitized_copy(src)
        # A plain File rooted in the cache folder, not File.generated: mkdocs-jupyter's wrapper reads
        # abs_src_path through src_dir, which a generated file does not have.
        files.append(File(f"notebooks/{src.name}", str(CACHE), config["site_dir"], config["use_directory_urls"]))
    _state["notebooks"] = _notebook_sources()
    for name in _api_pages():
        content = f"# `dpo_xpu.{name}`\n\n::: dpo_xpu.{name}\n"
        files.append(File.generated(config, f"api/{name}.md", content=content))
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
    defaults = dataclasses.asdict(Recipe())
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


def _notebook_list() -> str:
    items = _state.get("notebooks") or _notebook_sources()
    if not items:
        return "No notebooks are in `notebooks/` yet."
    lines = []
    for path, executed in items:
        how = "executed by `make demo`" if executed else "as committed, not executed (run `make demo` for outputs)"
        lines.append(f"- [{_title(path.stem)}]({path.name}): {how}")
    return "\n".join(lines)


def _api_index() -> str:
    import griffe

    import dpo_xpu

    package = griffe.load("dpo_xpu", search_paths=[str(ROOT)], resolve_aliases=False)
    rows = ["| name | module | what it is |", "|---|---|---|"]
    order = {name: i for i, name in enumerate(_api_pages())}
    for name, module in sorted(dpo_xpu._EXPORTS.items(), key=lambda kv: (order.get(kv[1], 99), kv[0])):
        obj = package[module].members.get(name)
        doc = obj.docstring.value if obj is not None and obj.docstring else ""
        summary = doc.strip().split("\n\n")[0].replace("\n", " ").replace("|", "\\|")
        rows.append(f"| [`{name}`][dpo_xpu.{module}.{name}] | [`dpo_xpu.{module}`]({module}.md) | {summary} |")
    return "\n".join(rows)


PLACEHOLDERS = {
    "<!-- dpo-xpu:recipe-options -->": _options_table,
    "<!-- dpo-xpu:recipes-shipped -->": _recipes_shipped,
    "<!-- dpo-xpu:curves-source -->": lambda: _state.get("curves_source", ""),
    "<!-- dpo-xpu:curves-numbers -->": _curves_numbers,
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
        html_text = _notebook_math(html_text)
    return _ROLE.sub(r"<code>\1</code>", html_text)


def on_post_build(config: Any) -> None:
    """Drop the notebook copies of notebooks that no longer exist (the cache stays small)."""
    keep = {p.name for p, _ in _notebook_sources()}
    folder = CACHE / "notebooks"
    for stale in folder.glob("*.ipynb") if folder.is_dir() else []:
        if stale.name not in keep:
            stale.unlink()
    if not keep and folder.is_dir():
        shutil.rmtree(folder, ignore_errors=True)
