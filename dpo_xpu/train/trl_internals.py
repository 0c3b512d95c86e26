"""Every reach of dpo_xpu into private or undocumented parts of TRL, transformers, accelerate, PEFT and
bitsandbytes, each behind one name here whose docstring says what breaks without it.

A release may rename any of them without notice: :func:`missing_internals` (run by :func:`require_internals` when
the trainer is built, and by ``tests/test_trl_internals.py``) names each one the installed libraries lack, with their
versions, so an upgrade fails at once in one line. No other module spells these names (the test checks it) but the
``_compute_loss`` override in :mod:`dpo_xpu.train.trainer` and ``models/backends/native.py`` (a layer below), which
sets bitsandbytes' ``Linear4bit.support_avx512bf16_for_cpu`` and transformers' ``config._name_or_path``; both are
checked here all the same.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import importlib.metadata
import inspect
import types
from collections.abc import Callable, Iterator
from typing import Any

#: TRL 1.x ``DPOTrainer`` methods dpo_xpu overrides or calls, with the parameters it passes.
TRAINER_METHODS_1X = {
    "_compute_loss": ("model", "inputs", "return_outputs"),
    "_load_from_checkpoint": ("resume_from_checkpoint", "model"),
    "_precompute_ref_logps": ("dataset", "name"),
    "compute_ref_log_probs": ("model", "inputs"),
}
TRAINER_METHODS_011 = {"get_batch_loss_metrics": ("model", "batch", "train_eval")}
#: Names read in ``trl.trainer.utils`` (TRL 1.x).
TRL_UTILS_1X = ("_use_triton", "_CHUNKED_LOGPROB_CHUNK_SIZE", "use_adapter", "selective_log_softmax")
#: Attributes TRL 1.x's ``DPOTrainer.__init__`` sets that dpo_xpu reads or writes (checked on a built trainer).
TRAINER_ATTRIBUTES_1X = ("_metrics", "precompute_ref_logps")
#: TRL 1.x's log-prob tile, tokens x vocabulary entries (``trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE`` by
#: ``trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE``, checked): a change makes the memory planner's logits term wrong.
LOGPROB_TILE = (4096, 32768)
#: The vocabulary entries per log-prob tile dpo_xpu's trainers use on the CPU (:func:`cpu_lm_head`).
CPU_LOGPROB_CHUNK = 2048
#: The fused LM head's argument that takes labels already shifted (scored as given); prefix sharing passes it.
SHIFT_LABELS = "shift_labels"
#: Config entries that record where a model came from, not what it computes.
CONFIG_BOOKKEEPING = ("_name_or_path", "transformers_version")
#: ``(module, object, names its source must hold)``: reaches into code that has no signature to check.
SOURCE_NAMES_1X = (
    ("trl.trainer.utils", "add_fused_lm_head", ("fused_lm_head", SHIFT_LABELS)),
    ("trl.trainer.dpo_trainer", "DPOTrainer", ("completion_mask",)),
    ("accelerate.accelerator", "Accelerator", ("_is_accelerate_prepared",)),
    ("bitsandbytes.nn.modules", "Linear4bit", ("support_avx512bf16_for_cpu",)),
)


def trl_generation() -> str:
    """``"1.x"`` for TRL >= 0.12's API (``processing_class=``, no ``max_prompt_length``), else ``"0.11"``: the one
    place that reads the installed TRL's generation."""
    import trl
    from packaging.version import Version

    return "1.x" if Version(trl.__version__) >= Version("0.12") else "0.11"


def installed_versions() -> str:
    """``"trl 1.16.0, transformers 5.25.0, peft 0.21.2, bitsandbytes 0.50.2"`` (``absent`` for a missing one)."""
    from importlib.metadata import PackageNotFoundError, version

    def one(name: str) -> str:
        try:
            return f"{name} {version(name)}"
        except PackageNotFoundError:
            return f"{name} absent"

    return ", ".join(one(n) for n in ("trl", "transformers", "accelerate", "peft", "bitsandbytes"))


def _missing_1x(where: str, trainer: Any) -> list[str]:
    import transformers
    import trl.trainer.utils as trl_utils

    problems = [f"{where}: trl.trainer.utils has no {n}" for n in TRL_UTILS_1X if not hasattr(trl_utils, n)]
    fused_output = getattr(trl_utils, "FusedCausalLMOutput", None)
    if fused_output is None or "log_probs" not in {f.name for f in dataclasses.fields(fused_output)}:
        problems.append(f"{where}: the fused LM head's output has no log_probs")
    try:
        from trl.kernels.chunked_logprob import TOKEN_CHUNK_SIZE

        tile = (TOKEN_CHUNK_SIZE, trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE)
    except (ImportError, AttributeError):
        tile = None
    if tile != LOGPROB_TILE:
        problems.append(f"{where}: TRL's log-prob tile is {tile}, the memory planner assumes {LOGPROB_TILE}")
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    fields = {f.name for f in dataclasses.fields(DataCollatorForPreference)}
    problems += [
        f"{where}: DataCollatorForPreference has no {n}" for n in ("max_length", "truncation_mode") if n not in fields
    ]
    config = transformers.PretrainedConfig()
    problems += [
        f"transformers {transformers.__version__}: a model config has no {n}"
        for n in ("_attn_implementation", "_name_or_path")
        if not hasattr(config, n)
    ]
    for module_name, name, names in SOURCE_NAMES_1X:
        library = module_name.split(".")[0]
        try:
            source = inspect.getsource(getattr(importlib.import_module(module_name), name))
        except (ImportError, AttributeError, OSError, TypeError):
            if library == "bitsandbytes":  # optional: no NF4 without it
                continue
            source = ""
        owner = f"{library} {importlib.metadata.version(library)}: {module_name}.{name}"
        problems += [f"{owner} no longer uses {n}" for n in names if n not in source]
    absent = [n for n in TRAINER_ATTRIBUTES_1X if trainer is not None and not hasattr(trainer, n)]
    return problems + [f"{where}: a built DPOTrainer has no attribute {n}" for n in absent]


def missing_internals(trainer: Any | None = None) -> list[str]:
    """The private names dpo_xpu relies on that the installed libraries lack, one line each naming the library and
    its version (``"trl 1.17.0: DPOTrainer has no method _compute_loss (dpo_xpu overrides or calls it)"``); empty
    when all are there. With a built ``trainer``, its attributes (:data:`TRAINER_ATTRIBUTES_1X`) are checked too."""
    import trl
    from trl import DPOTrainer

    where = f"trl {trl.__version__}"
    problems = []
    methods = TRAINER_METHODS_1X if trl_generation() == "1.x" else TRAINER_METHODS_011
    for name, params in methods.items():
        method = getattr(DPOTrainer, name, None)
        if method is None:
            problems.append(f"{where}: DPOTrainer has no method {name} (dpo_xpu overrides or calls it)")
            continue
        absent = [p for p in params if p not in inspect.signature(method).parameters]
        if absent:
            problems.append(f"{where}: DPOTrainer.{name} lacks the parameter(s) {', '.join(absent)}")
    return problems + (_missing_1x(where, trainer) if trl_generation() == "1.x" else [])


def require_internals(trainer: Any | None = None) -> None:
    """Raise ``RuntimeError`` when :func:`missing_internals` finds anything: the missing names, the installed
    versions and the fix, in one line."""
    problems = missing_internals(trainer)
    if problems:
        raise RuntimeError(
            "dpo_xpu does not support the installed TRL: "
            + "; ".join(problems)
            + f" (installed: {installed_versions()}). Fix: install the TRL release dpo_xpu is tested with "
            "(environment.yml: trl 1.16 for the native backend; environment-ipex-llm.yml: trl 0.11.4), or upgrade "
            "dpo_xpu"
        )


def step_metrics(trainer: Any) -> dict[str, list[float]]:
    """TRL's metric lists of the current mode (``train`` or ``eval``): one value appended per micro-batch. Breaks
    without ``_metrics``: the own losses' ``rewards/*`` cannot replace TRL's."""
    return trainer._metrics["train" if trainer.model.training else "eval"]


@contextlib.contextmanager
def reference_logps_from_batch(trainer: Any) -> Iterator[None]:
    """Within the block, TRL reads ``ref_chosen_logps`` / ``ref_rejected_logps`` from the batch. Breaks without
    ``precompute_ref_logps``: TRL runs a second reference forward."""
    before = trainer.precompute_ref_logps
    trainer.precompute_ref_logps = True
    try:
        yield
    finally:
        trainer.precompute_ref_logps = before


def route_reference_precompute(trainer: Any, precompute: Callable[..., Any]) -> Callable[..., Any]:
    """Replace the trainer's ``_precompute_ref_logps`` by ``precompute(trainer, dataset, name, batch=None)`` for the
    rest of the run, read the log-probs from the datasets from now on, and return the bound method. Breaks without
    it: ``evaluate(new_dataset)`` bypasses the reference cache."""
    trainer._precompute_ref_logps = types.MethodType(precompute, trainer)
    trainer.precompute_ref_logps = True
    trainer.args.precompute_ref_log_probs = True
    return trainer._precompute_ref_logps


def mark_prepared(model: Any) -> None:
    """Make accelerate's ``prepare`` return ``model`` unchanged. Breaks without it: a CPU reference is moved to the
    accelerator (or, 4-bit, refused)."""
    model._is_accelerate_prepared = True


def answer_mask(inputs: dict[str, Any]) -> Any:
    """The batch's answer mask ``[2B, T]`` (1 on answer tokens), chosen rows first (:func:`chosen_rejected`). Breaks
    without it: the own losses' answer log-probs and lengths."""
    return inputs["completion_mask"]


def chosen_rejected(rows: Any) -> tuple[Any, Any]:
    """Split a tensor over TRL's batch rows ``[2B, ...]`` into its chosen and rejected halves ``[B, ...]``."""
    return rows.chunk(2, dim=0)


def is_fused_head_call(kwargs: dict[str, Any]) -> bool:
    """Whether a model call's keyword arguments are TRL's fused-LM-head call (``labels=..., fused_lm_head=True``).
    Breaks without it: prefix sharing never packs."""
    return bool(kwargs.get("fused_lm_head")) and kwargs.get("labels") is not None


def fused_head_log_probs(output: Any) -> Any:
    """The per-token log-probs ``[rows, T - 1]`` of a fused-LM-head call's output. Breaks without it: the own
    losses."""
    return output.log_probs


def attn_implementation(module: Any) -> str | None:
    """The attention implementation transformers runs ``module`` with (``"sdpa"``, ``"eager"``, ...), else None.
    Breaks without it: prefix sharing cannot pick its mask's form."""
    return getattr(getattr(module, "config", None), "_attn_implementation", None)


def config_origin(config: Any, name: str | None = None) -> tuple[str | None, str | None]:
    """``(name or path, hub commit)`` a model config was loaded from (``None`` where unknown); ``name`` overrides
    the config's own. The commit: ``config._commit_hash`` (transformers 4.x), else for a hub id the snapshot folder of
    the hub cache holding its ``config.json`` (5.x)."""
    from pathlib import Path

    name, commit = name or getattr(config, "_name_or_path", None), getattr(config, "_commit_hash", None)
    if commit is None and name and not Path(name).expanduser().exists():
        from huggingface_hub import try_to_load_from_cache

        try:
            found = try_to_load_from_cache(name, "config.json")
        except Exception:  # noqa: BLE001 - not a valid hub id: no commit to read
            found = None
        commit = Path(found).parent.name if isinstance(found, str) else None
    return name, commit


def collator_truncation(trainer: Any) -> tuple[int | None, str]:
    """``(max_length, truncation_mode)`` TRL's collator truncates with (the trainer's args where it has none).
    Breaks without them: the reference cache reuses stale log-probs after a truncation change."""
    collator, args = trainer.data_collator, trainer.args
    return getattr(collator, "max_length", args.max_length), getattr(collator, "truncation_mode", args.truncation_mode)


@contextlib.contextmanager
def cpu_lm_head() -> Iterator[bool]:
    """Within the block, TRL 1.x's fused LM head runs as suits a CPU: answer tokens only, narrow vocabulary tiles.

    - **Answer tokens only.** TRL scores only the labelled positions on Triton devices, every position elsewhere (on
      Neuron a changing count would recompile the graph: ``trl.trainer.utils``, ``compact``). The CPU compiles
      nothing, so there the prompt and padding positions are pure waste (the LM head dominates a step on 150k-token
      vocabularies).
    - **Tiles of :data:`CPU_LOGPROB_CHUNK` vocabulary entries**, not TRL's 32,768: on the CPU TRL's torch fallback
      holds about eight float32 tiles at once in the backward (``memory.CPU_TILE_COPIES``), which made the LM head's
      backward the peak of a step (SmolLM2-135M-Instruct, 700 scored tokens: 750 MiB of tiles), and its element-wise
      passes run from cache in a narrow tile (1.5 s against 0.8 s per forward and backward of TRL's function
      there, measured on this project's 2-core CI machine). The log-sum-exp is online across tiles, so each
      log-prob is the same up to float rounding.

    Each scored log-prob is computed by TRL's own kernels. No library offers this. Both switches are put back on
    exit; :func:`cpu_lm_head_for` scopes them to one trainer.

    Yields:
        ``True`` when TRL has the switches, ``False`` for a TRL without them (0.11 has no fused LM head).
    """
    import trl.trainer.utils as trl_utils

    before = getattr(trl_utils, "_use_triton", None)
    chunk_before = getattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", None)
    if before is None or chunk_before is None:
        yield False
        return
    trl_own = getattr(before, "trl_own", before)

    def compact_positions(device: Any) -> bool:
        return device.type == "cpu" or trl_own(device)

    compact_positions.trl_own = trl_own  # type: ignore[attr-defined]
    trl_utils._use_triton = compact_positions
    trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = CPU_LOGPROB_CHUNK
    try:
        yield True
    finally:
        trl_utils._use_triton = before
        trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = chunk_before


#: The trainer methods :func:`cpu_lm_head_for` runs under the switches.
SCORING_METHODS = ("train", "evaluate", "predict", "compute_ref_log_probs")


def cpu_lm_head_for(trainer: Any) -> None:
    """Run the trainer's :data:`SCORING_METHODS` under :func:`cpu_lm_head`; other trainers in the process keep
    TRL's behaviour."""
    for name in SCORING_METHODS:
        method = getattr(trainer, name, None)
        if method is None:
            continue

        @functools.wraps(method)
        def scoped(*args: Any, _method: Callable[..., Any] = method, **kwargs: Any) -> Any:
            with cpu_lm_head():
                return _method(*args, **kwargs)

        setattr(trainer, name, scoped)


def use_adapter(model: Any, adapter_name: str | None) -> Any:
    """TRL's context manager that runs a PEFT model with ``adapter_name`` active (``None``: adapters off). Breaks
    without it: the evaluation samples of TRL's frozen ``ref`` adapter."""
    from trl.trainer.utils import use_adapter as trl_use_adapter

    return trl_use_adapter(model, adapter_name=adapter_name)


def selective_log_softmax() -> Callable[[Any, Any], Any] | None:
    """TRL's memory-saving ``log_softmax`` + ``gather`` (TRL >= 0.14), or ``None`` where it is absent."""
    import trl.trainer.utils as trl_utils

    return getattr(trl_utils, "selective_log_softmax", None)


def keep_dtypes_before_ddp(trainer: Any, keeper: Any) -> None:
    """Cast the LoRA weights ``trainer`` reloads on resume (PEFT upcasts them to float32) back with ``keeper`` (its
    ``KeepTrainableDtypes`` callback) right after ``Trainer._load_from_checkpoint``, before DDP builds its buckets:
    the callback's ``on_train_begin`` comes too late, and the ranks' LoRA weights then drift apart (measured).
    Raises ``AttributeError`` where transformers lacks ``_load_from_checkpoint``."""
    load = trainer._load_from_checkpoint

    def load_then_cast(resume_from_checkpoint: str, model: Any = None) -> None:
        load(resume_from_checkpoint, model)
        keeper.on_train_begin(trainer.args, trainer.state, trainer.control, model=trainer.model)

    trainer._load_from_checkpoint = load_then_cast
