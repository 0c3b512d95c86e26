"""A GGUF file as a model: accepted wherever a model is named, converted once into the model cache, and named as the
file names it (the adapter's base_model_name_or_path, the model card), while loading keeps the converted folder.

stories260K's GGUF file (1.2 MB, in ../shared) converts in seconds; SmolLM2's is read only for its metadata.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import SMOLLM2_GGUF

from dpo_xpu.errors import ModelLoadError
from dpo_xpu.models.base import resolve_model_path
from dpo_xpu.models.gguf import GGUF_MARKER, find_gguf, model_cache_dir, model_origin

pytest.importorskip("gguf", reason="reading GGUF files needs the gguf package (the test extra has it)")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """The dpo_xpu cache of this test: converted models go to <cache>/models."""
    monkeypatch.setenv("DPO_XPU_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def gguf_folder(stories260k_path, tmp_path):
    """A folder holding stories260K's GGUF file and nothing else (no config.json)."""
    folder = tmp_path / "gguf-model"
    folder.mkdir()
    shutil.copyfile(stories260k_path / "stories260K.gguf", folder / "stories260K.gguf")
    return folder


def test_the_model_cache_is_its_own_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("DPO_XPU_CACHE_DIR", str(tmp_path / "c"))
    assert model_cache_dir() == tmp_path / "c" / "models"
    monkeypatch.delenv("DPO_XPU_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert model_cache_dir() == tmp_path / "home" / ".cache" / "dpo_xpu" / "models"  # not reference-logps/


def test_a_gguf_file_or_its_folder_is_converted_once_into_the_model_cache(gguf_folder, cache, monkeypatch):
    gguf = gguf_folder / "stories260K.gguf"
    folder = Path(resolve_model_path(gguf))
    assert folder.parent == cache / "models" and folder.name.startswith("stories260K-")
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    origin = json.loads((folder / GGUF_MARKER).read_text())
    assert origin["gguf"] == str(gguf) and origin["name"] == "llama"  # what the file says: general.name
    assert origin["metadata"]["architecture"] == "llama"

    import transformers

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_conversion)
    assert resolve_model_path(gguf_folder) == str(folder)  # the folder holding it: the same conversion, reused
    assert resolve_model_path(str(gguf), tokenizer_only=True) == str(folder)
    assert resolve_model_path(folder) == str(folder)  # the converted folder is a model folder like any other


def test_a_folder_of_several_gguf_files_is_one_line_naming_them(gguf_folder, cache):
    shutil.copyfile(gguf_folder / "stories260K.gguf", gguf_folder / "other.gguf")
    message = f"model folder {gguf_folder} holds no config.json but several GGUF files (other.gguf, stories260K.gguf)"
    with pytest.raises(ModelLoadError, match=rf"^{re.escape(message)}: give the one to train as model_name_or_path$"):
        resolve_model_path(gguf_folder)
    assert not (cache / "models").exists() or not any((cache / "models").glob("*-bfloat16"))


def test_without_the_gguf_package_the_error_says_how_to_install_it(gguf_folder, cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf raises ImportError
    with pytest.raises(ModelLoadError, match=r"is a GGUF file: reading it needs the gguf package \(pip install gguf\)"):
        resolve_model_path(gguf_folder / "stories260K.gguf")


def test_the_adapter_and_the_card_name_the_gguf_model_and_the_merge_finds_its_base(gguf_folder, cache, tmp_path):
    """The policy loads from the converted folder but carries the file's name into adapter_config.json; the card
    names the file; export_merged finds the base from the recipe (the GGUF path), not from the adapter's name."""
    from dpo_xpu.models.loading import load_policy_model, load_tokenizer
    from dpo_xpu.outputs.model_card import model_card
    from dpo_xpu.pipeline import export_merged
    from dpo_xpu.recipes import make_recipe

    gguf = gguf_folder / "stories260K.gguf"
    policy = load_policy_model(gguf, quantization="none", device="cpu", dtype=torch.float32)
    assert policy.peft_config["default"].base_model_name_or_path == "llama"
    assert Path(policy.base_model.model.config._name_or_path).parent == cache / "models"  # loaded from the cache
    adapter = tmp_path / "run" / "adapter"
    with warnings.catch_warnings(record=True) as caught:  # no PEFT warning about the name's missing config.json
        policy.save_pretrained(adapter)
        load_tokenizer(gguf).save_pretrained(adapter)
    assert not [w for w in caught if "Could not find a config file" in str(w.message)]
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == "llama"

    recipe = make_recipe({"model_name_or_path": str(gguf_folder), "output_dir": str(tmp_path / "run")})
    card = model_card(recipe.to_dict(), [])
    assert "# DPO LoRA adapter for llama" in card and f"GGUF file (llama.cpp's format) `{gguf}`" in card
    assert "base_model:" not in card and str(cache) not in card  # no hub id to name; never the cache folder

    merged = export_merged(recipe, adapter, tmp_path / "run")
    assert (merged / "config.json").is_file() and (merged / "model.safetensors").is_file()


def test_other_models_have_no_gguf_origin(stories260k_path, tmp_path):
    assert find_gguf(stories260k_path) is None  # a model folder (config.json) holding a GGUF file too stays itself
    assert model_origin(stories260k_path) is None and model_origin("HuggingFaceTB/SmolLM2-135M-Instruct") is None
    assert model_origin(tmp_path / "missing.gguf") is None


def test_the_smollm2_file_states_its_name_and_organization():
    if not SMOLLM2_GGUF.is_file():
        pytest.skip(f"shared asset {SMOLLM2_GGUF} is absent (set DPO_XPU_SHARED)")
    origin = model_origin(SMOLLM2_GGUF.parent)  # a folder holding the file: read from the file, not converted
    metadata = origin["metadata"]
    assert origin["name"] == metadata["name"] == "Smollm2 135M 8k Lc100K Mix1 Ep2"
    assert metadata["organization"] == "HuggingFaceTB" and metadata["basename"] == "smollm2"
    assert metadata["size_label"] == "135M" and metadata["languages"] == ["en"]


def _damaged_copy(source: Path, dest: Path, keep: int = 0, data: bytes | None = None) -> Path:
    """``dest`` holding ``data``, else the first ``keep`` bytes of ``source`` (negative: all but the last ones)."""
    if data is None:
        with source.open("rb") as file:
            data = file.read(keep) if keep > 0 else file.read()[:keep]
    dest.write_bytes(data)
    return dest


DAMAGED = r"is a truncated or damaged GGUF file \([\w.]+: .*\): download or copy it again"


@pytest.mark.parametrize(
    ("keep", "data"),
    [(100, None), (-100, None), (0, b"not a GGUF file\n" * 64)],
    ids=["header-cut", "tensor-data-cut", "no-gguf"],
)
def test_a_damaged_gguf_file_is_one_line_naming_it(gguf_folder, cache, tmp_path, keep, data):
    damaged = _damaged_copy(gguf_folder / "stories260K.gguf", tmp_path / "damaged.gguf", keep, data)
    size = damaged.stat().st_size
    with pytest.raises(
        ModelLoadError, match=rf"^model {re.escape(str(damaged))} \({size:,} bytes\) {DAMAGED}"
    ) as error:
        resolve_model_path(damaged)
    assert "\n" not in str(error.value)
    assert not list((cache / "models").glob("damaged-*"))  # nothing converted, nothing half-written


def test_the_tester_s_cut_smollm2_file_is_one_line(cache, tmp_path):
    """The reported case: the first 1,000,000 bytes of SmolLM2's file (struct.error inside transformers' reader)."""
    if not SMOLLM2_GGUF.is_file():
        pytest.skip(f"shared asset {SMOLLM2_GGUF} is absent (set DPO_XPU_SHARED)")
    cut = _damaged_copy(SMOLLM2_GGUF, tmp_path / "trunc.gguf", 1_000_000)
    with pytest.raises(ModelLoadError, match=rf"^model {re.escape(str(cut))} \(1,000,000 bytes\) {DAMAGED}"):
        resolve_model_path(cut)


def test_a_failure_of_transformers_gguf_reader_is_one_line_too(cache, tmp_path, monkeypatch):
    """Any exception of a GGUF reader on a damaged file: here transformers' own, past a check that let it through."""
    import dpo_xpu.models.gguf as gguf_module

    if not SMOLLM2_GGUF.is_file():
        pytest.skip(f"shared asset {SMOLLM2_GGUF} is absent (set DPO_XPU_SHARED)")
    cut = _damaged_copy(SMOLLM2_GGUF, tmp_path / "trunc.gguf", 1_000_000)
    monkeypatch.setattr(gguf_module, "_gguf_origin", lambda path: {"gguf": str(path), "name": "x", "metadata": {}})
    with pytest.raises(ModelLoadError, match=rf"^model {re.escape(str(cut))}") as error:
        resolve_model_path(cut)
    assert "\n" not in str(error.value)
    assert "truncated or damaged" in str(error.value) or "transformers cannot read this GGUF file" in str(error.value)
