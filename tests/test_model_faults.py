"""A damaged or hostile model, tokenizer, adapter or SFT checkpoint ends as one ModelLoadError line that names the
file and the fix, before training starts (issue #22): each case on a copy of stories260K, on the CPU."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from helpers import run_cli, set_args

from dpo_xpu.errors import ModelLoadError
from dpo_xpu.models.base import LoraSettings, loading, resolve_model_path
from dpo_xpu.models.loading import load_policy_model, load_sft_state_dict, load_tokenizer, load_trained_policy

REDOWNLOAD = (
    r"cannot be read \(\w+Error\b.*\): it is damaged or was cut short \(an interrupted download or copy\): download or"
)


@pytest.fixture
def model(stories260k_path, tmp_path) -> Path:
    """A writable copy of stories260K (its Hugging Face files, without the GGUF)."""
    folder = tmp_path / "model"
    folder.mkdir()
    for file in (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        shutil.copyfile(stories260k_path / file, folder / file)
    return folder


def _policy(path: Path, quantization: str = "none", **kwargs):
    return load_policy_model(path, quantization, "cpu", torch.float32, LoraSettings(), **kwargs)


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    return message


def _cut(file: Path, keep: int | None = None) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2 if keep is None else keep])


def _edit_json(file: Path, **changes) -> None:
    values = json.loads(file.read_text())
    values.update(changes)
    file.write_text(json.dumps(values))


# 1. damaged files


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_a_cut_short_safetensors_file_is_named(model, quantization):
    _cut(model / "model.safetensors")
    with pytest.raises(ModelLoadError) as error:
        _policy(model, quantization)
    assert _one_line(error).startswith(f"model {model}: model.safetensors cannot be read (SafetensorError: ")
    assert "incomplete metadata" in str(error.value)


@pytest.mark.parametrize(
    ("name", "damage"),
    [
        ("tokenizer.json", lambda f: _cut(f, 5000)),
        ("tokenizer.json", lambda f: f.write_bytes(b"\x80\xff" * 100)),
        ("tokenizer_config.json", lambda f: f.write_text("{ 'not': json")),
        ("config.json", lambda f: _cut(f, 100)),
    ],
    ids=["tokenizer-cut", "tokenizer-binary", "tokenizer-config-quotes", "config-cut"],
)
def test_a_damaged_json_file_is_named_for_the_tokenizer_and_the_model(model, name, damage):
    damage(model / name)
    with pytest.raises(ModelLoadError, match=rf"^tokenizer {model}: {name} {REDOWNLOAD}"):
        load_tokenizer(model)
    with pytest.raises(ModelLoadError, match=rf"^model {model}: {name} {REDOWNLOAD}") as error:
        _policy(model)
    _one_line(error)


@pytest.mark.parametrize("text", ['{"version": "1.0", "model": {"type": "Nope"}}', "[1, 2]"], ids=["no-keys", "list"])
def test_a_tokenizer_json_of_the_wrong_structure_is_one_line(model, text):
    (model / "tokenizer.json").write_text(text)
    with pytest.raises(
        ModelLoadError, match=rf"^tokenizer {model}: \w+Error: .*tokenizer.json, tokenizer_config.json"
    ) as error:
        load_tokenizer(model)
    _one_line(error)


def test_a_config_that_is_no_json_object_is_refused(model):
    (model / "config.json").write_text("[1, 2]")
    with pytest.raises(ModelLoadError, match=rf"^model {model}: config.json holds no JSON object: it is damaged"):
        _policy(model)


def test_damaged_sft_checkpoints_are_one_line(stories260k_path, tmp_path):
    torch.save({"state": {"x": torch.zeros(4)}}, tmp_path / "policy.pt")
    _cut(tmp_path / "policy.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "text.pt").write_text("hello, not a checkpoint")
    for name in ("policy.pt", "empty.pt", "text.pt"):
        with pytest.raises(ModelLoadError, match=rf"^sft_checkpoint {tmp_path / name}: the file {REDOWNLOAD}") as error:
            load_sft_state_dict(tmp_path / name, stories260k_path)
        _one_line(error)


# 2. folders that are no model


def test_a_folder_without_config_json_is_named_with_what_it_holds(model):
    (model / "config.json").unlink()
    with pytest.raises(ModelLoadError) as error:
        _policy(model)
    assert _one_line(error) == (
        f"model folder {model} holds no config.json (it holds generation_config.json, model.safetensors, "
        "tokenizer.json, tokenizer_config.json): give a Hugging Face model folder (config.json, the weights and the "
        "tokenizer files, as save_pretrained or hf download writes them), or a GGUF file"
    )
    assert load_tokenizer(model).pad_token is not None  # a folder holding a tokenizer is one for load_tokenizer


def test_a_folder_that_is_no_model_is_refused_for_model_and_tokenizer(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ModelLoadError, match=rf"^model folder {tmp_path} holds no config.json \(it holds notes.txt\)"):
        _policy(tmp_path)
    with pytest.raises(
        ModelLoadError, match=r"holds neither a tokenizer \(tokenizer_config.json, tokenizer.json\) nor"
    ):
        load_tokenizer(tmp_path)
    with pytest.raises(ModelLoadError, match=r"notes.txt is a file, not a model folder: give the folder that holds"):
        resolve_model_path(tmp_path / "notes.txt")


def test_missing_weights_are_named(model):
    (model / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=rf"^model {model}: a file it needs is missing .*model.safetensors") as e:
        _policy(model)
    _one_line(e)


# 3. a model's own code


def test_a_model_needing_its_own_code_is_refused(model):
    auto_map = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    _edit_json(model / "config.json", model_type="xmodel", auto_map=auto_map)
    with pytest.raises(ModelLoadError) as error:
        _policy(model)
    message = _one_line(error)
    assert message.startswith(f"model {model}: it needs its own Python code (config.json auto_map: AutoConfig -> ")
    assert "which dpo_xpu never runs (trust_remote_code" in message
    assert "use a model whose architecture transformers" in message


def test_a_tokenizer_needing_its_own_code_is_refused(model):
    auto_map = {"AutoTokenizer": ["tokenization_x.XTokenizer", None]}
    _edit_json(model / "tokenizer_config.json", tokenizer_class="XTokenizer", auto_map=auto_map)
    with pytest.raises(ModelLoadError, match=rf"^tokenizer {model}: it needs its own Python code .* never runs"):
        load_tokenizer(model)


def test_an_auto_map_on_a_type_transformers_ships_loads_with_transformers_code(model):
    """transformers builds a known model type with its own classes (auto_map unused): nothing to refuse."""
    _edit_json(model / "config.json", auto_map={"AutoModelForCausalLM": "modeling_x.XForCausalLM"})
    assert type(_policy(model).get_base_model()).__name__ == "LlamaForCausalLM"


# 4. pickles that could run code


class _RunsCode:
    """Pickles as a call of os.system (GLOBAL posix.system): unpickling it without weights_only would run it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _hostile(file: Path, marker: Path, zip_format: bool = False) -> Path:
    if zip_format:
        torch.save({"state": _RunsCode(marker)}, file)  # pickles, never calls, os.system
    else:
        file.write_bytes(pickle.dumps({"lora_A": _RunsCode(marker)}, protocol=2))
    assert b"system" in file.read_bytes()
    return file


REFUSED = (
    r"is refused: it is a pickle that names posix.system, which PyTorch's weights-only loading refuses \(loading "
    r"it fully could run code on this machine\): use safetensors weights instead"
)


@pytest.fixture
def hostile_adapter(tmp_path) -> Path:
    from peft import LoraConfig

    folder = tmp_path / "adapter"
    LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM").save_pretrained(folder)
    _hostile(folder / "adapter_model.bin", tmp_path / "ran")
    return folder


def test_a_hostile_adapter_pickle_is_refused(stories260k_path, hostile_adapter, tmp_path):
    with pytest.raises(ModelLoadError, match=rf"^adapter_name_or_path {hostile_adapter}: adapter_model.bin {REFUSED}"):
        _policy(stories260k_path, adapter_name_or_path=hostile_adapter)
    with pytest.raises(ModelLoadError, match=rf"^adapter {hostile_adapter}: adapter_model.bin {REFUSED}") as error:
        load_trained_policy(stories260k_path, hostile_adapter, "none", "cpu", torch.float32)
    _one_line(error)
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize(("name", "zip_format"), [("policy.pt", True), ("policy.bin", False)])
def test_a_hostile_sft_checkpoint_is_refused(stories260k_path, tmp_path, name, zip_format):
    checkpoint = _hostile(tmp_path / name, tmp_path / "ran", zip_format)
    with pytest.raises(ModelLoadError, match=rf"^sft_checkpoint {checkpoint}: the file {REFUSED}") as error:
        load_sft_state_dict(checkpoint, stories260k_path)
    _one_line(error)
    assert not (tmp_path / "ran").exists()


def test_a_hostile_pickle_as_model_weights_is_refused(model, tmp_path):
    (model / "model.safetensors").unlink()
    _hostile(model / "pytorch_model.bin", tmp_path / "ran")
    with pytest.raises(ModelLoadError, match=rf"^model {model}: pytorch_model.bin {REFUSED}"):
        _policy(model)
    assert not (tmp_path / "ran").exists()


# 5. model types transformers does not know


def test_an_unknown_model_type_is_refused(model):
    import transformers

    _edit_json(model / "config.json", model_type="frobnicator")
    with pytest.raises(ModelLoadError) as error:
        _policy(model, "nf4")
    assert _one_line(error) == (
        f"model {model}: config.json names the model type 'frobnicator', which transformers "
        f"{transformers.__version__} does not know: if the model is newer than it, upgrade transformers (pip install "
        f"-U transformers); else use a model whose architecture transformers {transformers.__version__} ships "
        "(Llama, Qwen2, Mistral, Gemma, Phi-3, ...)"
    )


def test_a_config_without_model_type_is_refused(model, stories260k_path, tmp_path):
    config = json.loads((model / "config.json").read_text())
    del config["model_type"]
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=rf"^model {model}: config.json names no model_type"):
        _policy(model)
    torch.save({"state": {}}, tmp_path / "policy.pt")
    with pytest.raises(ModelLoadError, match="names no model_type"):
        load_sft_state_dict(tmp_path / "policy.pt", model)


# the wrapper and the command line


def test_other_exceptions_pass_through_the_wrapper(tmp_path):
    """A bug inside a load keeps its type and traceback: only the known failures become a ModelLoadError."""
    for bug in (ValueError("a bug"), KeyError("a bug"), RuntimeError("a bug"), OSError("a bug")):
        with pytest.raises(type(bug), match="a bug") as error:
            with loading("model", tmp_path):
                raise bug
        assert not isinstance(error.value, ModelLoadError)


def test_the_cli_stops_before_the_run_folder_with_one_line(model, orca_rows_path, tmp_path):
    _cut(model / "model.safetensors")
    run = tmp_path / "run"
    args = set_args(output_dir=run, dataset_name_or_path=orca_rows_path, model_name_or_path=model, device="cpu")
    result = run_cli("train", "--recipe", "recipes/cpu_tiny.yaml", *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"dpo-xpu: error: model {model}: model.safetensors cannot be read (SafetensorError: " in result.stderr
    assert not run.exists()


# 6. files that each read, but do not make a model together


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory) -> Path:
    """The demo's Qwen2-config model: the case where transformers builds an empty tokenizer from config.json."""
    from dpo_xpu.demo import build_demo_model

    return build_demo_model(tmp_path_factory.mktemp("demo") / "model")


def test_a_model_folder_without_tokenizer_files_is_refused(demo_model, tmp_path):
    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(demo_model / name, folder / name)
    with pytest.raises(
        ModelLoadError, match=rf"^model folder {folder} holds no tokenizer files \(tokenizer.json, "
    ) as error:
        load_tokenizer(folder)
    assert "copy the model's tokenizer files into it" in _one_line(error)


def test_an_empty_tokenizer_is_refused(model):
    """The class of the fault above: a tokenizer of a handful of tokens, which encodes ordinary text to nothing."""
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1}, unk_token="<unk>")).save(str(model / "tokenizer.json"))
    with pytest.raises(
        ModelLoadError, match=rf"^tokenizer {model} is empty \(\d+ tokens; 'hello world' encodes to "
    ) as error:
        load_tokenizer(model)
    assert "are not the model's: copy the model's tokenizer files" in _one_line(error)


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_a_config_that_does_not_match_the_weights_is_refused(model, quantization):
    _edit_json(model / "config.json", hidden_size=128)
    with pytest.raises(ModelLoadError) as error:
        _policy(model, quantization)
    message = _one_line(error)
    assert message.startswith(f"model {model}: config.json does not match the weights file model.safetensors: ")
    assert "[512, 64] in model.safetensors, [512, 128] by config.json" in message  # a differing tensor, named
    assert message.endswith("copy the config.json that came with these weights (or the weights of this config)")


@pytest.fixture
def adapter(stories260k_path, tmp_path) -> Path:
    """A LoRA adapter (r=4 on q_proj) saved from stories260K."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "adapter"
    base = AutoModelForCausalLM.from_pretrained(stories260k_path)
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM")).save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (
            "{}",
            r"adapter_config.json is no PEFT adapter config \(an object with 'peft_type', .*it holds the keys \[\]\)",
        ),
        ("[1, 2]", r"adapter_config.json is no PEFT adapter config .*it holds a JSON list\)"),
        ("{'peft_type'", r"adapter_config.json cannot be read \(JSONDecodeError: "),
        ('{"peft_type": "PROMPT_TUNING"}', r"a PROMPT_TUNING adapter, not LoRA \(peft_type\)"),
        ({"r": "4"}, r"adapter_config.json key 'r' holds '4', not int"),
        ({"lora_alpha": None}, r"adapter_config.json key 'lora_alpha' holds None, not int or float"),
        ({"target_modules": 5}, r"adapter_config.json key 'target_modules' holds 5, not list or str"),
        ({"peft_type": "NOPE"}, r"a NOPE adapter, not LoRA"),
    ],
    ids=["empty", "array", "no-json", "not-lora", "r-text", "alpha-null", "targets-number", "unknown-type"],
)
def test_a_damaged_adapter_config_is_one_line(stories260k_path, adapter, text, words):
    if isinstance(text, dict):
        _edit_json(adapter / "adapter_config.json", **text)
    else:
        (adapter / "adapter_config.json").write_text(text)
    fix = r": give a run's adapter/ folder as training saved it \(copy it again from the run folder\)$"
    with pytest.raises(ModelLoadError, match=rf"^adapter {adapter}: {words}.*{fix}") as error:
        load_trained_policy(stories260k_path, adapter, "none", "cpu", torch.float32)
    _one_line(error)
    with pytest.raises(ModelLoadError, match=rf"^adapter_name_or_path {adapter}: {words}.*{fix}"):
        _policy(stories260k_path, adapter_name_or_path=adapter)


def test_an_adapter_whose_weights_do_not_fit_the_base_is_one_line(stories260k_path, adapter):
    _edit_json(adapter / "adapter_config.json", r=8)  # the weights are r=4: shapes differ, as on another base
    with pytest.raises(ModelLoadError, match=rf"^adapter {adapter}: its tensors do not fit this base model") as error:
        load_trained_policy(stories260k_path, adapter, "none", "cpu", torch.float32)
    assert "give the base it was trained on, or copy the adapter/ folder again" in _one_line(error)
