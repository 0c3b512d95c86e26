"""The documentation site: strict build, content checks, and a real-browser check of the built pages.

    .venv/bin/python -m pytest -q -m docs tests/test_docs.py

The site is built with ``mkdocs build --strict`` into ``build/docs-test/site`` (git-ignored) and the browser
check leaves one screenshot per page in ``build/docs-test/screenshots/``. The browser is Debian's headless
Chromium driven by Selenium through Debian's chromedriver (nothing is downloaded by Selenium Manager); when
``/usr/bin/chromium`` or ``/usr/bin/chromedriver`` is missing and we are root, the test installs them with
apt-get, and skips with the reason when that is impossible.
"""

from __future__ import annotations

import functools
import html
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytestmark = pytest.mark.docs

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "build" / "docs-test"
SITE = OUT / "site"
SCREENSHOTS = OUT / "screenshots"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


@functools.cache
def _hooks():
    """docs/hooks.py as a module (it is not a package module: MkDocs loads it by path)."""
    pytest.importorskip("mkdocs", reason="the docs extra is not installed: pip install -e '.[docs]'")
    spec = importlib.util.spec_from_file_location("dpo_xpu_docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _build(dest: Path, **env: str) -> Path:
    """``mkdocs build --strict`` into ``dest`` (replaced), with extra environment variables; return ``dest``."""
    pytest.importorskip("mkdocs", reason="the docs extra is not installed: pip install -e '.[docs]'")
    if dest.exists():
        shutil.rmtree(dest)
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(dest)]
    start = time.perf_counter()
    res = subprocess.run(
        cmd,
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1", **env},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    elapsed = time.perf_counter() - start
    assert res.returncode == 0, f"mkdocs build --strict failed ({elapsed:.1f} s):\n{res.stdout}\n{res.stderr}"
    print(f"mkdocs build --strict: {elapsed:.1f} s -> {dest}")
    return dest


@pytest.fixture(scope="module")
def site() -> Path:
    """The site as ``make docs`` builds it (with whatever ``runs/demo`` holds), built once for this module."""
    return _build(SITE)


#: What a page must not load: anything from another host (the browser check runs offline).
EXTERNAL = re.compile(
    r"""<(?:script|img|iframe)\b[^>]*\bsrc=["']?(?:https?:)?//"""
    r"""|<link\b[^>]*\bhref=["']?(?:https?:)?//"""
    r"""|@import\s+url\(["']?(?:https?:)?//"""
)


def _text(page: Path) -> str:
    """The visible text of a built page (tags removed, entities decoded)."""
    raw = page.read_text(encoding="utf-8")
    raw = re.sub(r"<(script|style)\b.*?</\1>", " ", raw, flags=re.S)
    return html.unescape(re.sub(r"<[^>]+>", " ", raw))


def test_strict_build_has_every_page(site: Path) -> None:
    pages = ("getting-started", "hardware", "results", "how-dpo-works", "backends", "options", "performance")
    for page in ("index.html", *pages, "troubleshooting"):
        path = site / page if page.endswith(".html") else site / page / "index.html"
        assert path.is_file(), f"{path} was not built"
    assert (site / "assets" / "reward_curves.png").stat().st_size > 1000
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        page = site / "notebooks" / notebook.stem / "index.html"
        assert page.is_file(), f"no page for {notebook.name}"
        assert 'id="notebook-status"' in page.read_text(encoding="utf-8"), f"{page} does not say what it shows"
    # one API page per step of the data flow, each module under its own heading there, none on a page of its own
    hooks = _hooks()
    groups = [g for g in hooks.api_groups() if g[3]]
    assert [g[0] for g in groups][:3] == ["recipe", "environment", "data"] and groups[-1][0] == "pipeline-cli"
    assert sorted(p.name for p in (site / "api").iterdir() if p.is_dir()) == sorted(g[0] for g in groups)
    for slug, _title, _what, modules in groups:
        text = (site / "api" / slug / "index.html").read_text(encoding="utf-8")
        for module in modules:
            assert f'id="dpo_xpu.{module}"' in text, f"dpo_xpu.{module} has no heading on api/{slug}"
    for module in ("device", "environment", "data.preferences", "models.loading", "recipes", "pipeline", "errors"):
        assert (site / hooks.api_page_of(module).replace(".md", "/index.html")).is_file(), module
    for page in site.rglob("*.html"):
        found = EXTERNAL.search(page.read_text(encoding="utf-8"))
        assert found is None, f"{page.relative_to(site)} loads from another host: {found.group(0)!r}"


def test_results_page_shows_a_real_run(site: Path) -> None:
    """The Results page: the curves, the held-out figures and the samples of the demo run (the committed copies
    in docs/assets/ when runs/demo has none), each with where it comes from; Performance keeps its machines."""
    page = (site / "results" / "index.html").read_text(encoding="utf-8")
    assert 'id="reward-curves"' in page
    text = " ".join(_text(site / "results" / "index.html").split())
    run = _hooks().DEMO_RUN
    evaluation = run / "evaluation.json" if (run / "reward_curves.png").is_file() else None
    if evaluation is None or not evaluation.is_file():
        evaluation = ROOT / "docs" / "assets" / "demo_evaluation.json"
    figures = json.loads(evaluation.read_text(encoding="utf-8"))
    assert f"{figures['reward_accuracy']:.2f}" in text and f"{figures['mean_margin']:.4f}" in text
    assert evaluation.name in text, "the evaluation table does not say where it comes from"
    assert "samples.jsonl" in text and "<|im_start|>" in text and "policy" in text and "reference" in text
    perf = " ".join(_text(site / "performance" / "index.html").split())
    for fact in ("AMD EPYC", "TRL 1.16", "7810d65", "NVIDIA H200", "0.54x", "671 MiB", "slower than TRL"):
        assert fact in perf, f"the Performance page lost {fact!r}"


def test_hook_selects_executed_notebooks_when_present(tmp_path: Path) -> None:
    """docs/hooks.py's choice of what a notebook page shows, without a build: the executed copy of a demo run when
    it ran to the end and holds the committed cells (papermill's injected parameters aside), else the committed
    notebook with the reason."""
    hooks = _hooks()
    committed = sorted((ROOT / "notebooks").glob("03_*.ipynb"))[0]
    executed_dir = tmp_path / "runs" / "demo" / "notebooks"
    executed_dir.mkdir(parents=True)

    missing = hooks.select_notebook(committed, executed_dir)
    assert (missing.path, missing.executed) == (committed, False) and "no executed copy" in missing.note

    nb = json.loads(committed.read_text(encoding="utf-8"))
    params = next(i for i, c in enumerate(nb["cells"]) if "parameters" in c["metadata"].get("tags", []))
    injected = {
        "cell_type": "code",
        "metadata": {"tags": ["injected-parameters"]},
        "source": 'recipe_file = "../recipes/cpu_demo.yaml"\n',
    }
    injected |= {"outputs": [], "execution_count": 1}
    nb["cells"].insert(params + 1, injected)
    code = next(c for c in nb["cells"] if c["cell_type"] == "code" and c is not injected)
    code["outputs"] = [{"output_type": "stream", "name": "stdout", "text": ["step 30/30  loss 0.2970\n"]}]
    papermill = {
        "parameters": {"recipe_file": "../recipes/cpu_demo.yaml"},
        "end_time": "2026-01-02T03:04:05",
        "exception": None,
    }
    nb["metadata"]["papermill"] = papermill
    copy = executed_dir / committed.name
    copy.write_text(json.dumps(nb), encoding="utf-8")
    picked = hooks.select_notebook(committed, executed_dir)
    assert (picked.path, picked.executed) == (copy, True)
    assert (
        "2026-01-02" in picked.note
        and 'recipe_file = "../recipes/cpu_demo.yaml"' in picked.note
        and "make demo" in picked.note
    )
    assert [s.executed for s in hooks.notebook_sources(executed_dir)].count(True) == 1

    papermill["exception"] = True
    copy.write_text(json.dumps(nb), encoding="utf-8")
    failed = hooks.select_notebook(committed, executed_dir)
    assert (failed.path, failed.executed) == (committed, False) and "stopped at an error" in failed.note

    papermill["exception"] = None
    code["source"] = "print('an older version of this cell')"
    copy.write_text(json.dumps(nb), encoding="utf-8")
    stale = hooks.select_notebook(committed, executed_dir)
    assert (stale.path, stale.executed) == (committed, False) and "older version" in stale.note

    # `python docs/hooks.py --demo-current` (what `make docs` asks before it builds) fails while a copy is missing
    env = {**os.environ, "DPO_XPU_DOCS_DEMO_RUN": str(tmp_path / "runs" / "demo")}
    res = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "hooks.py"), "--demo-current"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 1 and "no executed copy" in res.stdout, res.stdout + res.stderr


def _hardware_cells(text: str) -> list[tuple[int, str, str]]:
    """(GiB, recipe file, planned GiB as written) for each recipe named in a Markdown table whose first column or
    header gives the GPU memory as "N GB"."""
    found = []
    header: list[str] = []
    for line in text.splitlines():
        if not line.startswith("|"):
            header = []
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if not header:
            header = cells
            continue
        for i, cell in enumerate(cells):
            recipe = re.search(r"`(?:recipes/)?([\w.-]+\.yaml)`(?: \((\d+\.\d) GiB\))?", cell)
            size = re.match(r"(\d+) GB", cells[0]) or (re.match(r"(\d+) GB", header[i]) if i < len(header) else None)
            if recipe and size:
                found.append((int(size.group(1)), recipe.group(1), recipe.group(2) or ""))
    return found


def test_hardware_tables_agree_with_the_planner() -> None:
    """The recipe that README.md and docs/hardware.md give for each GPU memory size fits it by the memory planner,
    and the planned peak they print is the planner's."""
    from dpo_xpu.recipes import load_recipe
    from dpo_xpu.train.memory import recipe_fits

    hooks = _hooks()
    planned = {item["recipe"]: item["estimate"].total_mib for item in hooks.recipe_estimates()}
    assert "arc_16gb_qwen2.5_1.5b.yaml" in planned, "the notebooks' default recipe is not in the planner's table"
    for doc in (ROOT / "README.md", ROOT / "docs" / "hardware.md"):
        cells = _hardware_cells(doc.read_text(encoding="utf-8"))
        assert len(cells) >= 8, f"{doc.name}: no hardware table found"
        for gib, name, written in cells:
            recipe = load_recipe(ROOT / "recipes" / name)
            verdict = recipe_fits(recipe, gib * 1024, config=hooks.MODEL_SHAPES[recipe.model_name_or_path])
            assert verdict.fits, f"{doc.name}: {name} for {gib} GB, but the planner says: {verdict.message}"
            if written:
                assert written == f"{planned[name] / 1024:.1f}", f"{doc.name}: {name} planned at {written} GiB"


_PNG_1PX = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="


def test_build_with_executed_notebooks_and_no_demo_picture(tmp_path: Path) -> None:
    """The other branch of docs/hooks.py: executed notebooks present (with widget state, which must not reach
    the page), and no ``reward_curves.png``, so the picture is drawn from the committed metrics."""
    notebook = sorted((ROOT / "notebooks").glob("03_*.ipynb"))[0]
    demo = tmp_path / "demo"
    (demo / "notebooks").mkdir(parents=True)
    nb = json.loads(notebook.read_text(encoding="utf-8"))
    widget = {"model_id": "abc", "version_major": 2, "version_minor": 0}
    nb.setdefault("metadata", {})["widgets"] = {
        "application/vnd.jupyter.widget-state+json": {"state": {}, "version_major": 2, "version_minor": 0}
    }
    code = next(cell for cell in nb["cells"] if cell["cell_type"] == "code")
    code["outputs"] = [
        {
            "output_type": "display_data",
            "metadata": {},
            "data": {"image/png": _PNG_1PX, "text/plain": ["<Figure>"]},
        },
        {
            "output_type": "display_data",
            "metadata": {},
            "data": {"application/vnd.jupyter.widget-view+json": widget, "text/plain": ["progress 30/30"]},
        },
    ]
    (demo / "notebooks" / notebook.name).write_text(json.dumps(nb), encoding="utf-8")

    site = _build(tmp_path / "site", DPO_XPU_DOCS_DEMO_RUN=str(demo))
    page = (site / "notebooks" / notebook.stem / "index.html").read_text(encoding="utf-8")
    assert "data:image/png;base64," in page, "the executed notebook's output is not on its page"
    assert "progress 30/30" in page, "the widget's text fallback is not on the page"
    assert "widget-state" not in page and "widget-view" not in page, "widget state reached the page"
    assert EXTERNAL.search(page) is None
    assert (site / "assets" / "reward_curves.png").stat().st_size > 1000
    how = _text(site / "how-dpo-works" / "index.html")
    assert "demo_metrics.jsonl" in how, "the fallback picture does not say where it comes from"
    assert "Executed outputs" in _text(site / "notebooks" / notebook.stem / "index.html")
    others = [p for p in sorted((ROOT / "notebooks").glob("*.ipynb")) if p != notebook]
    if others:
        other = " ".join(_text(site / "notebooks" / others[0].stem / "index.html").split())
        assert "Not executed" in other and "no executed copy in the demo run" in other
    index = " ".join(_text(site / "notebooks" / "index.html").split())
    assert f"as executed in {demo / 'notebooks' / notebook.name}" in index
    assert "as committed, without outputs" in index
    results = " ".join(_text(site / "results" / "index.html").split())
    assert "docs/assets/demo_evaluation.json" in results and "docs/assets/demo_samples.jsonl" in results


def test_options_page_lists_every_recipe_key(site: Path) -> None:
    from dpo_xpu.recipes import recipe_keys

    page = (site / "options" / "index.html").read_text(encoding="utf-8")
    table = page[page.index('id="every-key"') : page.index('id="recipes-shipped"')]
    missing = [key for key in recipe_keys() if not re.search(rf"<code\b[^>]*>{key}</code>", table)]
    assert not missing, f"recipe keys missing from the options table: {missing}"
    assert re.search(r"TRL(&#39;|&rsquo;|&#x27;|')s default: <code\b", table), (
        "the options page lacks TRL's defaults where ours differ"
    )
    for recipe in sorted((ROOT / "recipes").glob("*.yaml")):
        assert recipe.name in page, f"recipes/{recipe.name} is not on the options page"


def test_troubleshooting_quotes_the_package_messages(site: Path) -> None:
    """The quoted messages must be the package's own: each fragment below is checked against the source."""
    text = " ".join(_text(site / "troubleshooting" / "index.html").split())
    fragments = {
        "device.py": ["is visible to PyTorch"],
        "environment.py": ["ipex-llm is installed but oneAPI's setvars.sh was not sourced"],
        "train/trl_config.py": ["is not computed by the installed TRL"],
        "data/rows.py": ["pair states no preference"],
    }
    for module, quotes in fragments.items():
        source = " ".join((ROOT / "dpo_xpu" / module).read_text(encoding="utf-8").split())
        for quote in quotes:
            assert quote in source, f"{quote!r} is no longer in dpo_xpu/{module}: update docs/troubleshooting.md"
            assert quote in text, f"{quote!r} is not quoted on the troubleshooting page"


def _walk(module):  # griffe modules, depth first
    yield module
    for sub in module.modules.values():
        yield from _walk(sub)


def test_public_functions_have_docstrings() -> None:
    """Every public function, class and method of every module, and every re-exported name, has a docstring.

    Read statically with griffe (what mkdocstrings renders), so no module is imported. Trainer event hooks
    (``on_*`` of a ``TrainerCallback`` subclass) are documented by transformers and exempt.
    """
    griffe = pytest.importorskip("griffe", reason="the docs extra is not installed: pip install -e '.[docs]'")
    import dpo_xpu

    package = griffe.load("dpo_xpu", search_paths=[str(ROOT)], resolve_aliases=False)
    missing = []
    for module in _walk(package):
        if not module.docstring:
            missing.append(f"{module.path} (module)")
        for name, obj in module.members.items():
            if name.startswith("_") or obj.is_alias or not (obj.is_function or obj.is_class):
                continue
            if not obj.docstring:
                missing.append(obj.path)
            if obj.is_class:
                callback = any("TrainerCallback" in str(base) for base in obj.bases)
                for method_name, method in obj.members.items():
                    if method_name.startswith("_") or method.is_alias or not method.is_function:
                        continue
                    if callback and method_name.startswith("on_"):
                        continue
                    if not method.docstring:
                        missing.append(method.path)
    for name, module_name in dpo_xpu._EXPORTS.items():
        obj = package[module_name].members.get(name)
        assert obj is not None, f"dpo_xpu._EXPORTS names {name!r} in {module_name}, which does not define it"
        if (obj.is_function or obj.is_class) and not obj.docstring:
            missing.append(f"{obj.path} (exported as dpo_xpu.{name})")
    assert not missing, "public objects without a docstring:\n  " + "\n  ".join(sorted(set(missing)))


def test_every_export_is_on_an_api_page(site: Path) -> None:
    import dpo_xpu

    hooks = _hooks()
    for name, module in dpo_xpu._EXPORTS.items():
        page = site / hooks.api_page_of(module).replace(".md", "/index.html")
        assert page.is_file(), f"no API page for dpo_xpu.{module}"
        assert f'id="dpo_xpu.{module}.{name}"' in page.read_text(encoding="utf-8"), f"{name} not on {page}"


# ----------------------------------------------------------------------------------------------- browser


def _ensure_chromium() -> None:
    """Install Debian's chromium and chromium-driver when absent and we are root; skip when impossible."""
    if CHROMIUM.exists() and CHROMEDRIVER.exists():
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip(f"{CHROMIUM} or {CHROMEDRIVER} is missing and cannot be installed here (not root or no apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"]
    res = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900, check=False)
    if res.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600, check=False)
        res = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900, check=False)
    if res.returncode != 0 or not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip(f"could not install chromium and chromium-driver with apt-get: {res.stderr.strip()[-300:]}")


@pytest.fixture(scope="module")
def server(site: Path) -> Iterator[str]:
    """Serve the built site on 127.0.0.1 (an ephemeral port) from a thread; yield the base URL."""

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(site)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """Headless Chromium through Selenium and Debian's chromedriver, logging the console at every level."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed: pip install -e '.[test]'")
    _ensure_chromium()
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,1400",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _notebook_03() -> str:
    found = sorted((ROOT / "notebooks").glob("03_*.ipynb"))
    assert found, "notebooks/03_*.ipynb (the training notebook) is missing"
    return found[0].stem


_IMAGES_JS = """
return Array.from(document.images).map(img => ({src: img.currentSrc || img.src, id: img.id,
    complete: img.complete, width: img.naturalWidth}));
"""


#: Sidebar entries whose label does not fit (Material cuts it with an ellipsis).
_CLIPPED_JS = """
return Array.from(document.querySelectorAll('.md-sidebar--primary .md-ellipsis'))
    .filter(e => e.offsetParent !== null && e.scrollWidth > e.clientWidth + 1).map(e => e.textContent.trim());
"""
#: Code in a table's first column, or marked nowrap, that the browser broke over two lines.
_WRAPPED_JS = """
return Array.from(document.querySelectorAll('article td:first-child code, article table code.nowrap'))
    .filter(e => e.getClientRects().length > 1).map(e => e.textContent);
"""


def _open(driver, url: str, name: str) -> dict:
    """Load ``url``, wait for its images, save a screenshot and return what the page showed."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    WebDriverWait(driver, 30).until(lambda d: d.execute_script("return document.readyState") == "complete")
    WebDriverWait(driver, 30).until(lambda d: all(i["complete"] for i in d.execute_script(_IMAGES_JS)))
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))
    if driver.execute_script("return !!document.getElementById('reward-curves')"):
        driver.execute_script("document.getElementById('reward-curves').scrollIntoView({block: 'center'})")
        time.sleep(0.8)  # let the header's title transition finish
        driver.save_screenshot(str(SCREENSHOTS / f"{name}-reward-curves.png"))
    return {
        "clipped": driver.execute_script(_CLIPPED_JS),
        "wrapped": driver.execute_script(_WRAPPED_JS),
        "title": driver.title,
        "h1": driver.execute_script("const h = document.querySelector('article h1'); return h ? h.innerText : ''"),
        "text": driver.execute_script("return document.body.innerText"),
        "images": driver.execute_script(_IMAGES_JS),
        "math": driver.execute_script("return document.querySelectorAll('article math').length"),
        "cells": driver.execute_script("return document.querySelectorAll('.jupyter-wrapper .jp-Cell').length"),
        "console": driver.get_log("browser"),
    }


def test_pages_render_in_a_real_browser(site: Path, server: str, browser) -> None:
    notebook = _notebook_03()
    pages = {
        "index": "",
        "how-dpo-works": "how-dpo-works/",
        f"notebook-{notebook}": f"notebooks/{notebook}/",
        "results": "results/",
        "hardware": "hardware/",
        "options": "options/",
        "api-environment": "api/environment/",
    }
    seen = {name: _open(browser, server + path, name) for name, path in pages.items()}

    for name, page in seen.items():
        errors = [entry for entry in page["console"] if entry.get("level") == "SEVERE"]
        assert not errors, f"{name}: the browser console logged errors: {errors}"
        broken = [img["src"] for img in page["images"] if not img["width"]]
        assert not broken, f"{name}: images that did not load: {broken}"
        assert page["title"].endswith("dpo_xpu"), f"{name}: unexpected title {page['title']!r}"
        assert not page["clipped"], f"{name}: sidebar labels cut short: {page['clipped']}"
        assert not page["wrapped"], f"{name}: code in a table broken over two lines: {page['wrapped'][:5]}"

    assert "Quick start" in seen["index"]["text"] and "make demo" in seen["index"]["text"]

    how = seen["how-dpo-works"]
    assert how["h1"].rstrip("¶ ") == "How DPO works here"
    curves = [img for img in how["images"] if img["id"] == "reward-curves"]
    assert curves and curves[0]["width"] > 0, "the reward-curve picture did not load"
    assert how["math"] >= 2, "the DPO objective was not rendered as MathML"

    nb = seen[f"notebook-{notebook}"]
    assert nb["cells"] > 0, "the training notebook rendered no cells"
    assert "$$" not in nb["text"], "display math in the training notebook was not converted to MathML"
    assert nb["h1"], "the training notebook page has no heading"
    assert "Executed outputs" in nb["text"] or "Not executed" in nb["text"], "the page does not say what it shows"

    results = seen["results"]
    curves = [img for img in results["images"] if img["id"] == "reward-curves"]
    assert curves and curves[0]["width"] > 0, "the Results page's reward curves did not load"
    assert "Held-out evaluation" in results["text"] and "reward accuracy" in results["text"]

    assert "arc_16gb_qwen2.5_1.5b.yaml" in seen["hardware"]["text"] and "GiB" in seen["hardware"]["text"]

    api = seen["api-environment"]
    assert "select_device" in api["text"] and "DeviceNotAvailableError" in api["text"]
    assert api["h1"].rstrip("¶ ") == "Environment"
