"""Precomputed reference log-probs, cached on disk (the ``precomputed`` reference strategy).

DPO needs each pair's reference log-probability of the chosen and the rejected answer (Rafailov et al. 2023, eq. 7).
The reference never changes, so they are computed once, before training, with no gradient in length-sorted batches,
and each step runs the policy only. TRL 1.x can do this itself (``precompute_ref_log_probs``), but its cache is
keyed by the dataset fingerprint and a hash of the weights only: not by ``max_length`` or ``truncation_mode``
(applied later, by the collator), so changing them silently reuses stale values, and a damaged file goes unnoticed.
This module keeps TRL's computation (``DPOTrainer.compute_ref_log_probs``) and replaces the cache: the key is a
sha256 over everything that changes the numbers (:func:`reference_cache_key`); the file, ``<key>.safetensors``, holds
the key, row count and a checksum, is written atomically and is rebuilt with a warning when damaged; a valid file is
checked on two batches computed again (:func:`cached_logps_gap`) and recomputed when stale, so the step-0 check
(:mod:`dpo_xpu.train.step0`) sees the reference the run trains with.

Entry point: :func:`attach_precomputed_reference` on a built trainer, before ``train()``.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dpo_xpu.files import atomic_write_bytes, default_cache_dir, weights_digest
from dpo_xpu.train.step0 import STEP0_TOLERANCE
from dpo_xpu.train.trl_internals import (
    CONFIG_BOOKKEEPING,
    collator_truncation,
    config_origin,
    route_reference_precompute,
)

if TYPE_CHECKING:
    from datasets import Dataset

    from dpo_xpu.recipes import Recipe

logger = logging.getLogger(__name__)

#: Bumped when the file layout or the key's meaning changes; part of the key.
FORMAT_VERSION = 1
#: The tokenized columns TRL 1.x's ``DPOTrainer`` gives every row; the reference log-probs depend on them.
TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
#: Largest difference (nats) between a cached log-prob and the same batch computed again taken as the same value.
CHECK_TOLERANCE = STEP0_TOLERANCE


@dataclass
class CacheInfo:
    """What :func:`attach_precomputed_reference` did for one dataset: ``hit`` (the cached file was used), ``path``
    (``<cache_dir>/<key>.safetensors``), ``key`` (sha256 of ``components``, also written as ``<key>.json``), ``rows``,
    ``seconds`` (to load, or compute and write), ``rebuilt`` (an invalid or stale file was replaced) and ``stale``
    (a valid file's values differed from the reference model's: :func:`cached_logps_gap`)."""

    hit: bool
    path: Path
    key: str
    rows: int
    seconds: float
    rebuilt: bool = False
    components: dict[str, Any] = field(default_factory=dict)
    stale: bool = False


class CacheFileError(ValueError):
    """A cache file is unreadable, truncated, fails its checksum, or belongs to another key or row count."""


def _sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def tokenizer_digest(tokenizer: Any) -> tuple[str, str]:
    """``(tokenizer_sha256, chat_template_sha256)``: the fast tokenizer's full definition (the sorted vocabulary for a
    slow one), its special tokens and padding side; and the chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    extra = {"special": getattr(tokenizer, "special_tokens_map", {}), "padding_side": tokenizer.padding_side}
    tok = hashlib.sha256((body + json.dumps(extra, sort_keys=True, default=str)).encode()).hexdigest()
    return tok, _sha256_json(getattr(tokenizer, "chat_template", None))


def dataset_digest(dataset: Dataset, columns: tuple[str, ...] = TOKEN_COLUMNS) -> str:
    """sha256 over the token ids of ``columns`` in every row, in row order (data, tokenizer and chat template).

    Raises:
        KeyError: a column is missing (the dataset was not tokenized by ``DPOTrainer``).
    """
    import numpy as np
    import pyarrow.compute as pc

    if missing := [c for c in columns if c not in dataset.column_names]:
        raise KeyError(f"dataset lacks the tokenized column(s) {missing}; found {dataset.column_names}")
    h = hashlib.sha256(str(len(dataset)).encode())
    for batch in dataset.select_columns(list(columns)).with_format("arrow").iter(batch_size=4096):
        for name in columns:
            arr = batch.column(name)
            h.update(name.encode())
            h.update(np.asarray(pc.list_value_length(arr), dtype=np.int64).tobytes())
            h.update(np.asarray(pc.list_flatten(arr), dtype=np.int64).tobytes())
    return h.hexdigest()


def reference_cache_key(
    trainer: Any,
    dataset: Dataset,
    recipe_values: Mapping[str, Any] | None = None,
    model_name_or_path: str | None = None,
    memo_dir: Path | None = None,
) -> tuple[str, dict[str, Any]]:
    """The cache key for the reference log-probs of ``dataset`` (TRL-tokenized rows) under ``trainer`` (a TRL 1.x
    ``DPOTrainer``), with a recipe's ``backend``, ``quantization`` and ``max_prompt_length`` where given
    (``recipe_values``: ``Recipe.to_dict()``); the model is ``model_name_or_path``, else the recipe's, else its
    config's; ``memo_dir`` remembers weights digests.
    ``prefix_sharing`` and its packing are not part of it: they change the log-probs only by float rounding.

    Returns:
        ``(key, components)``: the sha256 hex digest and the JSON-able dict it was computed over.
    """
    import bitsandbytes
    import trl

    base = trainer.ref_model if trainer.ref_model is not None else trainer.model
    base = base.get_base_model() if hasattr(base, "get_base_model") else base
    config = base.config
    values = recipe_values or {}
    name, commit = config_origin(config, model_name_or_path or values.get("model_name_or_path"))
    path = Path(str(name)).expanduser()
    name = str(path.resolve()) if path.exists() else str(name)
    quant = getattr(config, "quantization_config", None)
    quant = quant.to_dict() if hasattr(quant, "to_dict") else quant
    config_dict = {k: v for k, v in config.to_dict().items() if k not in CONFIG_BOOKKEEPING}
    tok, template = tokenizer_digest(trainer.processing_class)
    args = trainer.args
    max_length, truncation_mode = collator_truncation(trainer)
    peft_config = getattr(trainer.model, "peft_config", {}) or {}
    components = {
        "format_version": FORMAT_VERSION,
        "model": name,
        "weights": weights_digest(name, commit, memo_dir=memo_dir),
        "model_config": _sha256_json(config_dict),
        "quantization": quant,
        "recipe_quantization": values.get("quantization"),
        "backend": values.get("backend", "native"),
        "param_dtypes": sorted({str(p.dtype) for p in base.parameters()}),
        "autocast": "bf16" if args.bf16 else "fp16" if args.fp16 else "none",
        "device": trainer.accelerator.device.type,
        "tokenizer": tok,
        "chat_template": template,
        "data": dataset_digest(dataset),
        "rows": len(dataset),
        "max_length": max_length,
        "truncation_mode": truncation_mode,
        "max_prompt_length": values.get("max_prompt_length"),
        "ld_alpha": getattr(trainer, "ld_alpha", None),
        "ref_adapter": "ref" in peft_config,
        "trl": trl.__version__,
        "torch": torch.__version__,
        "bitsandbytes": bitsandbytes.__version__,
    }
    return _sha256_json(components), components


def _length_order(rows: Dataset) -> list[int]:
    """Row indices by increasing pair length (prompt + longer answer, tokens); ties keep row order."""
    lengths = [len(p) + max(len(c), len(r)) for p, c, r in zip(*(rows[c] for c in TOKEN_COLUMNS), strict=True)]
    return sorted(range(len(lengths)), key=lambda i: lengths[i])


def compute_reference_logps(
    trainer: Any, dataset: Dataset, batch_size: int, desc: str = "Reference log-probs"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference log-probs of every pair, with TRL's own ``compute_ref_log_probs`` (no grad, batched).

    Rows are batched by length, ``batch_size`` pairs each (results in row order), on ``trainer.ref_model``, else the
    policy with its adapters off; with prefix sharing packed as the training steps are (``compute_ref_log_probs``).

    Returns:
        ``(ref_chosen_logps, ref_rejected_logps)``, float32 CPU ``(len(dataset),)``: summed answer log-probs (nats).
    """
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    rows = dataset.select_columns(list(TOKEN_COLUMNS))
    order = _length_order(rows)
    loader = DataLoader(rows.select(order), batch_size=batch_size, collate_fn=trainer.data_collator, shuffle=False)
    model = trainer.ref_model if trainer.ref_model is not None else trainer.model
    device = trainer.accelerator.device
    chosen, rejected = [], []
    for batch in tqdm(loader, desc=desc):
        batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
        c, r = trainer.compute_ref_log_probs(model, batch)
        chosen.append(c.detach().float().cpu())
        rejected.append(r.detach().float().cpu())
    back = torch.tensor(order, dtype=torch.long).argsort()  # row order again
    ref_chosen = torch.cat(chosen)[back] if order else torch.zeros(0)
    ref_rejected = torch.cat(rejected)[back] if order else torch.zeros(0)
    if not (torch.isfinite(ref_chosen).all() and torch.isfinite(ref_rejected).all()):
        logger.warning("some reference log-probs are not finite (NaN/inf): check the model's numerics")
    return ref_chosen, ref_rejected


def _tensor_sha256(chosen: torch.Tensor, rejected: torch.Tensor) -> str:
    return hashlib.sha256(chosen.contiguous().numpy().tobytes() + rejected.contiguous().numpy().tobytes()).hexdigest()


def save_reference_logps(
    path: str | Path,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    key: str,
    components: dict[str, Any],
    batch_size: int | None = None,
) -> Path:
    """Write the cache file atomically (temporary file + rename) with its key, row count and checksum.

    ``chosen`` and ``rejected`` are float32 ``(rows,)``; ``components`` go beside it as ``<stem>.json`` (for people);
    ``batch_size`` (pairs per forward they were computed with) lets a later hit recompute its check batches exactly.
    Returns ``path``.
    """
    from safetensors.torch import save

    path = Path(path)
    chosen, rejected = chosen.float().contiguous(), rejected.float().contiguous()
    metadata = {"format_version": str(FORMAT_VERSION), "key": key, "rows": str(chosen.numel())}
    metadata.update(sha256=_tensor_sha256(chosen, rejected), batch_size=str(batch_size or ""))
    data = save({REF_COLUMNS[0]: chosen, REF_COLUMNS[1]: rejected}, metadata=metadata)
    atomic_write_bytes(path.with_suffix(".json"), json.dumps(components, indent=1, default=str).encode())
    atomic_write_bytes(path, data)
    return path


def load_reference_logps(path: str | Path, key: str, rows: int) -> tuple[torch.Tensor, torch.Tensor, int | None]:
    """Read and verify a cache file written for ``key``: ``(ref_chosen_logps, ref_rejected_logps, batch_size)``, the
    tensors ``(rows,)``, ``batch_size`` the pairs per forward they were computed with (``None``: not recorded).

    Raises:
        CacheFileError: unreadable (truncated, overwritten), another key, format version or row count, a wrong shape
            or dtype, or tensor bytes that fail the checksum.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in REF_COLUMNS}
    except Exception as exc:  # safetensors raises its own error types for a damaged header or short file
        raise CacheFileError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None
    if metadata.get("format_version") != str(FORMAT_VERSION) or metadata.get("key") != key:
        raise CacheFileError(f"{path}: written for another key or format version")
    if metadata.get("rows") != str(rows):
        raise CacheFileError(f"{path}: holds {metadata.get('rows')} rows, expected {rows}")
    chosen, rejected = tensors[REF_COLUMNS[0]], tensors[REF_COLUMNS[1]]
    for tensor in (chosen, rejected):
        if tensor.shape != (rows,) or tensor.dtype != torch.float32:
            raise CacheFileError(f"{path}: tensor of shape {tuple(tensor.shape)} {tensor.dtype}, expected ({rows},)")
    if _tensor_sha256(chosen, rejected) != metadata.get("sha256"):
        raise CacheFileError(f"{path}: checksum mismatch (the file is corrupted)")
    stored = metadata.get("batch_size", "")
    return chosen, rejected, int(stored) if stored.isdigit() else None


def cached_logps_gap(
    trainer: Any, dataset: Dataset, chosen: torch.Tensor, rejected: torch.Tensor, batch_size: int
) -> float:
    """How far cached reference log-probs are from the reference model's: the shortest and the longest batch of
    :func:`compute_reference_logps` are computed again (same order and padding), so values of this model match to the
    bit and stale ones (other weights, another truncation) differ by whole nats; two batches keep a hit cheap.

    Returns:
        The largest absolute difference over the rows checked, in nats (``inf`` where only one side is NaN); ``0.0``
        for an empty dataset.
    """
    order = _length_order(dataset.select_columns(list(TOKEN_COLUMNS)))
    last = (len(order) - 1) // batch_size * batch_size if order else 0
    rows = order[:batch_size] + order[last:] if last >= batch_size else order
    if not rows:
        return 0.0
    fresh = compute_reference_logps(trainer, dataset.select(rows), batch_size, desc="Checking cached reference")
    index = torch.tensor(rows, dtype=torch.long)
    gap = 0.0
    for new, old in zip(fresh, (chosen[index], rejected[index]), strict=True):
        diff = (new - old).abs()
        diff[new.isnan() & old.isnan()] = 0.0
        gap = max(gap, float(diff.nan_to_num(nan=math.inf).max()))
    return gap


def _cached_logps(
    trainer: Any,
    dataset: Dataset,
    cache_dir: Path,
    recipe_values: Mapping[str, Any] | None,
    batch_size: int | None,
    name: str,
    model_name_or_path: str | None,
) -> tuple[torch.Tensor, torch.Tensor, CacheInfo]:
    """``(ref_chosen_logps, ref_rejected_logps, info)`` of ``dataset`` from the cache, else computed and stored; a
    valid file more than :data:`CHECK_TOLERANCE` nats off on two recomputed batches (stale) is recomputed."""
    start = time.perf_counter()
    key, components = reference_cache_key(trainer, dataset, recipe_values, model_name_or_path, memo_dir=cache_dir)
    path = cache_dir / f"{key}.safetensors"
    args = trainer.args
    batch_size = batch_size or args.precompute_ref_batch_size or args.per_device_train_batch_size
    rebuilt = stale = False
    if path.exists():
        try:
            chosen, rejected, stored_batch_size = load_reference_logps(path, key, len(dataset))
        except CacheFileError as exc:
            logger.warning("reference log-prob cache %s is invalid (%s): recomputing it", path, exc)
            rebuilt = True
        else:
            gap = cached_logps_gap(trainer, dataset, chosen, rejected, stored_batch_size or batch_size)
            if gap <= CHECK_TOLERANCE:
                logger.info("reference log-probs for %s (%d pairs) loaded from %s", name, len(dataset), path)
                info = CacheInfo(True, path, key, len(dataset), time.perf_counter() - start, False, components)
                return chosen, rejected, info
            logger.warning(
                "reference log-prob cache %s is stale: its values differ from the reference model's by %.4g nats "
                "(more than %g) on the rows checked: recomputing it",
                *(path, gap, CHECK_TOLERANCE),
            )
            rebuilt = stale = True
    chosen, rejected = compute_reference_logps(trainer, dataset, batch_size, desc=f"Reference log-probs ({name})")
    save_reference_logps(path, chosen, rejected, key, components, batch_size)
    logger.info("reference log-probs for %s (%d pairs) computed and cached in %s", name, len(dataset), path)
    seconds = time.perf_counter() - start
    return chosen, rejected, CacheInfo(False, path, key, len(dataset), seconds, rebuilt, components, stale)


def _with_ref_columns(dataset: Dataset, chosen: torch.Tensor, rejected: torch.Tensor) -> Dataset:
    dataset = dataset.remove_columns([c for c in REF_COLUMNS if c in dataset.column_names])
    return dataset.add_column(REF_COLUMNS[0], chosen.tolist()).add_column(REF_COLUMNS[1], rejected.tolist())


def attach_precomputed_reference(
    trainer: Any,
    recipe: Recipe | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int | None = None,
    model_name_or_path: str | None = None,
    free_reference: bool = True,
) -> CacheInfo:
    """Give a TRL 1.x ``DPOTrainer`` cached reference log-probs, so that training runs the policy only.

    Call it on a trainer built with ``precompute_ref_log_probs=False``, before ``train()``. It adds the
    ``ref_chosen_logps`` / ``ref_rejected_logps`` columns to the train (and eval) dataset, from the cache or computed
    now (checked first: :func:`cached_logps_gap`), makes the trainer read them, routes later
    ``evaluate(new_dataset)`` calls through the same cache, and with ``free_reference`` drops a separate
    ``ref_model``. ``trainer.reference_cache_info`` is then the train split's :class:`CacheInfo`, and
    ``trainer.reference_cache_by_split`` maps each split's name (``"train"``, ``"eval"`` or the eval dict's keys) to
    its latest one.

    Returns:
        The train split's :class:`CacheInfo`.

    Raises:
        KeyError: the train dataset is not tokenized (no ``prompt_ids``/``chosen_ids``/``rejected_ids``).
        TypeError: the train dataset is not a map-style ``datasets.Dataset``.
    """
    from datasets import Dataset

    if not isinstance(found := trainer.train_dataset, Dataset):
        raise TypeError(f"precomputed reference log-probs need a map-style datasets.Dataset, found {type(found)}")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    values = recipe.to_dict() if recipe is not None else None

    def precompute(self: Any, dataset: Dataset, name: str, batch: int | None = None) -> Dataset:
        chosen, rejected, info = _cached_logps(
            self, dataset, cache_dir, values, batch_size or batch, name, model_name_or_path
        )
        by_split[name] = info
        return _with_ref_columns(dataset, chosen, rejected)

    by_split: dict[str, CacheInfo] = {}
    trainer.reference_cache_by_split = by_split
    cached = route_reference_precompute(trainer, precompute)  # evaluate(new_dataset) uses it too
    trainer.train_dataset = cached(trainer.train_dataset, "train")
    eval_dataset = trainer.eval_dataset
    if isinstance(eval_dataset, dict):
        trainer.eval_dataset = {k: cached(v, k) for k, v in eval_dataset.items()}
    elif eval_dataset is not None:
        trainer.eval_dataset = cached(eval_dataset, "eval")
    if free_reference and trainer.ref_model is not None:
        trainer.ref_model = None
        gc.collect()
        if torch.accelerator.is_available():
            torch.accelerator.empty_cache()
        logger.info("separate reference model freed: training reads the precomputed log-probs")
    trainer.reference_cache_info = by_split["train"]
    return trainer.reference_cache_info
