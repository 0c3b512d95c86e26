"""Precomputed reference log-probs, cached on disk (the ``precomputed`` reference strategy).

DPO needs, for every pair, the reference model's summed log-probability of the chosen and of the rejected
answer (Rafailov et al. 2023, eq. 7). The reference never changes, so they can be computed once, before
training, with no gradient and in length-sorted batches (little padding); each training step then runs the
policy only. TRL 1.x can do this itself (``precompute_ref_log_probs``), but its cache is keyed by the dataset
fingerprint and a hash of the weights only: it is not keyed by ``max_length`` or ``truncation_mode`` (applied
later, by the collator), so changing them silently reuses stale values, and a damaged cache file is not
detected. This module keeps TRL's computation (``DPOTrainer.compute_ref_log_probs``, same kernels, same
collator) and replaces the cache:

- the key is a sha256 over everything that changes the numbers (:func:`reference_cache_key`): the weights
  (a sha256 of the local weight files' bytes, remembered until a file changes, :func:`weights_digest`; or the hub
  id and commit), the model config and quantization, the
  compute dtype and autocast, the device type, the tokenizer and its chat template, the tokenized rows in
  order, ``max_length``, ``truncation_mode``, ``max_prompt_length``, and the TRL, torch and bitsandbytes
  versions;
- the file is ``<cache_dir>/<key>.safetensors`` (two float32 tensors of shape ``(rows,)``) with the key, the
  row count and a sha256 of the tensor bytes in its header, written to a temporary file and renamed into
  place; a file that is truncated, fails its checksum or has the wrong key or shape is rebuilt with a
  warning, never used;
- a valid file is checked before use: its shortest and longest batch are computed again with the reference
  (:func:`cached_logps_gap`, the same batches: equal to the bit), and a file whose values differ (stale: written for
  other weights) is recomputed with a warning, so that training never starts on it and the step-0 check
  (:mod:`dpo_xpu.train.step0`) of the run sees the reference it trains with.

```python
trainer = make_dpo_trainer(recipe, policy, None, tokenizer, train_dataset)  # precompute_ref_log_probs=False
info = attach_precomputed_reference(trainer, recipe)  # CacheInfo(hit=..., path=..., key=...)
trainer.train()
```
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpo_xpu.files import atomic_write_bytes, default_cache_dir, weights_digest
from dpo_xpu.train.step0 import STEP0_TOLERANCE
from dpo_xpu.train.trl_internals import route_reference_precompute

if TYPE_CHECKING:
    import torch
    from datasets import Dataset

    from dpo_xpu.recipes import Recipe

logger = logging.getLogger(__name__)

#: Bumped when the file layout or the key's meaning changes; part of the key.
FORMAT_VERSION = 1
#: The tokenized columns TRL 1.x's ``DPOTrainer`` gives every row; the reference log-probs depend on them.
TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
#: Largest difference (nats) between a cached reference log-prob and the same batch computed again that is taken as
#: the same value: the step-0 check's tolerance. Recomputed with the same batches, equal values agree to the bit.
CHECK_TOLERANCE = STEP0_TOLERANCE


@dataclass
class CacheInfo:
    """What :func:`attach_precomputed_reference` did for one dataset.

    Args:
        hit: the cached file was valid and used (``False``: computed now and written).
        path: the cache file, ``<cache_dir>/<key>.safetensors``.
        key: the sha256 hex digest of :attr:`components`.
        rows: pairs covered (the dataset's length).
        seconds: wall time to load (hit) or compute and write (miss).
        rebuilt: a file was present but invalid (truncated, bad checksum, wrong key or shape, or stale) and was
            rebuilt.
        components: the values the key was computed from (also written beside the file as ``<key>.json``).
        stale: a valid file's values differed from the reference model's on the rows checked
            (:func:`cached_logps_gap`), so it was recomputed (``rebuilt`` is then ``True`` too).
    """

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
    """Return ``(tokenizer_sha256, chat_template_sha256)``.

    The tokenizer digest covers the fast tokenizer's full definition (``backend_tokenizer.to_str()``: vocab,
    merges, normalizer, pre-tokenizer, added tokens), or the sorted vocabulary for a slow one, plus the special
    tokens and padding side.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    extra = json.dumps(
        {"special": getattr(tokenizer, "special_tokens_map", {}), "padding_side": tokenizer.padding_side},
        sort_keys=True,
        default=str,
    )
    tok = hashlib.sha256((body + extra).encode()).hexdigest()
    template = getattr(tokenizer, "chat_template", None)
    return tok, hashlib.sha256(json.dumps(template, sort_keys=True, default=str).encode()).hexdigest()


def dataset_digest(dataset: Dataset, columns: tuple[str, ...] = TOKEN_COLUMNS) -> str:
    """sha256 over the token ids of every row, in row order (so it covers data, tokenizer and chat template).

    Args:
        dataset: TRL-tokenized rows with list-of-int ``columns``.
        columns: the columns to hash. Default ``("prompt_ids", "chosen_ids", "rejected_ids")``.

    Raises:
        KeyError: a column is missing (the dataset was not tokenized by ``DPOTrainer``).
    """
    import numpy as np
    import pyarrow.compute as pc

    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise KeyError(f"dataset lacks the tokenized column(s) {missing}; found {dataset.column_names}")
    h = hashlib.sha256(str(len(dataset)).encode())
    for batch in dataset.select_columns(list(columns)).with_format("arrow").iter(batch_size=4096):
        for name in columns:
            arr = batch.column(name)
            h.update(name.encode())
            h.update(np.asarray(pc.list_value_length(arr), dtype=np.int64).tobytes())
            h.update(np.asarray(pc.list_flatten(arr), dtype=np.int64).tobytes())
    return h.hexdigest()


def _base_model(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def reference_cache_key(
    trainer: Any,
    dataset: Dataset,
    recipe: Recipe | None = None,
    model_name_or_path: str | None = None,
    memo_dir: Path | None = None,
) -> tuple[str, dict[str, Any]]:
    """The cache key for the reference log-probs of ``dataset`` under ``trainer``.

    ``prefix_sharing`` is not part of the key: packing a pair into one sequence changes the log-probs only by
    float rounding (the tests bound it at 1e-4), so a cache written with or without it serves both.

    Args:
        trainer: a TRL 1.x ``DPOTrainer`` (its model, tokenizer, collator settings and device are read).
        dataset: the TRL-tokenized rows (with ``prompt_ids``, ``chosen_ids``, ``rejected_ids``).
        recipe: the run's recipe, for ``backend``, ``quantization`` and ``max_prompt_length``; optional.
        model_name_or_path: the base model's folder or hub id; default the recipe's, else the model config's
            ``_name_or_path``.
        memo_dir: where :func:`weights_digest` remembers digests of local folders.

    Returns:
        ``(key, components)``: the sha256 hex digest and the JSON-able dict it was computed over.
    """
    import bitsandbytes
    import torch
    import trl

    base = _base_model(trainer.ref_model if trainer.ref_model is not None else trainer.model)
    config = base.config
    name = model_name_or_path or (recipe.model_name_or_path if recipe is not None else None) or config._name_or_path
    path = Path(str(name)).expanduser()
    name = str(path.resolve()) if path.exists() else str(name)
    quant = getattr(config, "quantization_config", None)
    quant = quant.to_dict() if hasattr(quant, "to_dict") else quant
    config_dict = {k: v for k, v in config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
    tok, template = tokenizer_digest(trainer.processing_class)
    args = trainer.args
    collator = trainer.data_collator  # TRL truncates in the collator, with these two values
    peft_config = getattr(trainer.model, "peft_config", {}) or {}
    components = {
        "format_version": FORMAT_VERSION,
        "model": name,
        "weights": weights_digest(name, getattr(config, "_commit_hash", None), memo_dir=memo_dir),
        "model_config": _sha256_json(config_dict),
        "quantization": quant,
        "recipe_quantization": recipe.quantization if recipe is not None else None,
        "backend": recipe.backend if recipe is not None else "native",
        "param_dtypes": sorted({str(p.dtype) for p in base.parameters()}),
        "autocast": "bf16" if args.bf16 else "fp16" if args.fp16 else "none",
        "device": trainer.accelerator.device.type,
        "tokenizer": tok,
        "chat_template": template,
        "data": dataset_digest(dataset),
        "rows": len(dataset),
        "max_length": getattr(collator, "max_length", args.max_length),
        "truncation_mode": getattr(collator, "truncation_mode", args.truncation_mode),
        "max_prompt_length": recipe.max_prompt_length if recipe is not None else None,
        "ld_alpha": getattr(trainer, "ld_alpha", None),
        "ref_adapter": "ref" in peft_config,
        "trl": trl.__version__,
        "torch": torch.__version__,
        "bitsandbytes": bitsandbytes.__version__,
    }
    return _sha256_json(components), components


def _length_order(rows: Dataset) -> list[int]:
    """Row indices by increasing pair length (prompt + longer answer, tokens); ties keep row order."""
    lengths = [
        len(p) + max(len(c), len(r))
        for p, c, r in zip(rows["prompt_ids"], rows["chosen_ids"], rows["rejected_ids"], strict=True)
    ]
    return sorted(range(len(lengths)), key=lambda i: lengths[i])


def compute_reference_logps(
    trainer: Any, dataset: Dataset, batch_size: int, desc: str = "Reference log-probs"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference log-probs of every pair, with TRL's own ``compute_ref_log_probs`` (no grad, batched).

    Rows are batched in order of length (so batches carry little padding) and the results put back in row
    order. The reference is ``trainer.ref_model`` when set, else the policy with its adapters disabled.

    Args:
        trainer: a TRL 1.x ``DPOTrainer``.
        dataset: TRL-tokenized rows.
        batch_size: pairs per forward (each pair is two sequences).
        desc: the progress bar's label.

    Returns:
        ``(ref_chosen_logps, ref_rejected_logps)``, float32 CPU tensors of shape ``(len(dataset),)``: summed
        log-probabilities (nats) of each answer's tokens, after the collator's truncation to ``max_length``.
    """
    import torch
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
    ref_chosen = torch.empty(len(order), dtype=torch.float32)
    ref_rejected = torch.empty(len(order), dtype=torch.float32)
    index = torch.tensor(order, dtype=torch.long)
    if order:
        ref_chosen[index] = torch.cat(chosen)
        ref_rejected[index] = torch.cat(rejected)
    if not (torch.isfinite(ref_chosen).all() and torch.isfinite(ref_rejected).all()):
        logger.warning("some reference log-probs are not finite (NaN/inf): check the model's numerics")
    return ref_chosen, ref_rejected


def _tensor_sha256(chosen: torch.Tensor, rejected: torch.Tensor) -> str:
    h = hashlib.sha256(chosen.contiguous().numpy().tobytes())
    h.update(rejected.contiguous().numpy().tobytes())
    return h.hexdigest()


def save_reference_logps(
    path: str | Path,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    key: str,
    components: dict[str, Any],
    batch_size: int | None = None,
) -> Path:
    """Write the cache file atomically (temporary file + rename) with its key, row count and checksum.

    Args:
        path (`str` or `Path`): the ``.safetensors`` file to write; ``<stem>.json`` beside it gets ``components``
            (for people).
        chosen (`torch.Tensor`): float32, shape ``(rows,)``; rejected (`torch.Tensor`): the same.
        key (`str`): the cache key, stored in the header and checked on load.
        components (`dict`): what the key was computed over.
        batch_size (`int`, *optional*): the pairs per forward they were computed with, stored so that a later hit
            recomputes its check batches exactly as they were (:func:`cached_reference_logps`).

    Returns:
        `Path`: ``path``.
    """
    from safetensors.torch import save

    path = Path(path)
    chosen, rejected = chosen.float().contiguous(), rejected.float().contiguous()
    metadata = {
        "format_version": str(FORMAT_VERSION),
        "key": key,
        "rows": str(chosen.numel()),
        "sha256": _tensor_sha256(chosen, rejected),
    }
    if batch_size is not None:
        metadata["batch_size"] = str(batch_size)
    data = save({REF_COLUMNS[0]: chosen, REF_COLUMNS[1]: rejected}, metadata=metadata)
    atomic_write_bytes(path.with_suffix(".json"), json.dumps(components, indent=1, default=str).encode())
    atomic_write_bytes(path, data)
    return path


def load_reference_logps(path: str | Path, key: str, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Read and verify a cache file.

    Args:
        path: the ``.safetensors`` file.
        key: the expected cache key.
        rows: the expected number of pairs.

    Returns:
        ``(ref_chosen_logps, ref_rejected_logps)``, float32 tensors of shape ``(rows,)``.

    Raises:
        CacheFileError: the file cannot be parsed (truncated or overwritten), lacks a tensor, has another key,
            format version or row count, a wrong shape or dtype, or its tensor bytes fail the sha256 checksum.
    """
    import torch
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
    return chosen, rejected


def _stored_batch_size(path: Path) -> int | None:
    """The batch size a valid cache file was computed with (``None``: not recorded, a file of an older dpo_xpu)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            value = (handle.metadata() or {}).get("batch_size", "")
    except Exception:  # replaced since it was read (another process): check with the current batch size
        return None
    return int(value) if value.isdigit() else None


def cached_logps_gap(
    trainer: Any, dataset: Dataset, chosen: torch.Tensor, rejected: torch.Tensor, batch_size: int
) -> float:
    """How far cached reference log-probs are from the reference model's, on the rows of two batches.

    The shortest and the longest batch of :func:`compute_reference_logps` (its length order, ``batch_size`` pairs
    each, the same padding) are computed again with the trainer's reference, so that values computed by this model
    match to the last bit and stale ones (other weights, another truncation) differ by whole nats. Two batches of
    the many a dataset has: a cache hit stays cheap.

    Args:
        trainer (`DPOTrainer`): a TRL 1.x ``DPOTrainer`` (its reference: ``ref_model``, else the adapter-off policy).
        dataset (`datasets.Dataset`): the TRL-tokenized rows the log-probs belong to.
        chosen (`torch.Tensor`): the cached ``ref_chosen_logps``, shape ``(len(dataset),)``; rejected
            (`torch.Tensor`): the cached ``ref_rejected_logps``.
        batch_size (`int`): the pairs per forward the cached values were computed with.

    Returns:
        `float`: the largest absolute difference over the rows checked, in nats (``inf`` where only one side is
        NaN); ``0.0`` for an empty dataset.
    """
    import torch

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


def cached_reference_logps(
    trainer: Any,
    dataset: Dataset,
    cache_dir: str | Path | None = None,
    recipe: Recipe | None = None,
    batch_size: int | None = None,
    name: str = "train",
    model_name_or_path: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, CacheInfo]:
    """Load the reference log-probs of ``dataset`` from the cache, or compute and store them.

    A valid file is checked before use: two of its batches are computed again (:func:`cached_logps_gap`), and a file
    whose values differ by more than :data:`CHECK_TOLERANCE` nats (stale: written for other weights, or by a
    dpo_xpu whose key missed a change) is recomputed with a warning, so that training never starts on it.

    Args:
        trainer (`DPOTrainer`): a TRL 1.x ``DPOTrainer``.
        dataset (`datasets.Dataset`): its TRL-tokenized rows (``trainer.train_dataset`` or an eval split).
        cache_dir (`str` or `Path`, *optional*): the cache folder; default :func:`default_cache_dir`.
        recipe (`Recipe`, *optional*): the run's recipe (see :func:`reference_cache_key`).
        batch_size (`int`, *optional*): pairs per reference forward; default ``args.precompute_ref_batch_size`` or
            ``args.per_device_train_batch_size``.
        name (`str`): the split's name, for messages.
        model_name_or_path (`str`, *optional*): the base model's folder or hub id (see :func:`reference_cache_key`).

    Returns:
        `tuple[torch.Tensor, torch.Tensor, CacheInfo]`: ``(ref_chosen_logps, ref_rejected_logps, info)``; tensors
        float32 of shape ``(len(dataset),)``.
    """
    start = time.perf_counter()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key, components = reference_cache_key(trainer, dataset, recipe, model_name_or_path, memo_dir=cache_dir)
    path = cache_dir / f"{key}.safetensors"
    args = trainer.args
    batch_size = batch_size or args.precompute_ref_batch_size or args.per_device_train_batch_size
    rebuilt = stale = False
    if path.exists():
        try:
            chosen, rejected = load_reference_logps(path, key, len(dataset))
        except CacheFileError as exc:
            logger.warning("reference log-prob cache %s is invalid (%s): recomputing it", path, exc)
            rebuilt = True
        else:
            gap = cached_logps_gap(trainer, dataset, chosen, rejected, _stored_batch_size(path) or batch_size)
            if gap <= CHECK_TOLERANCE:
                logger.info("reference log-probs for %s (%d pairs) loaded from %s", name, len(dataset), path)
                info = CacheInfo(True, path, key, len(dataset), time.perf_counter() - start, False, components)
                return chosen, rejected, info
            logger.warning(
                "reference log-prob cache %s is stale: its values differ from the reference model's by %.4g nats "
                "(more than %g) on the rows checked: recomputing it",
                path,
                gap,
                CHECK_TOLERANCE,
            )
            rebuilt = stale = True
    chosen, rejected = compute_reference_logps(trainer, dataset, batch_size, desc=f"Reference log-probs ({name})")
    save_reference_logps(path, chosen, rejected, key, components, batch_size)
    logger.info("reference log-probs for %s (%d pairs) computed and cached in %s", name, len(dataset), path)
    seconds = time.perf_counter() - start
    return chosen, rejected, CacheInfo(False, path, key, len(dataset), seconds, rebuilt, components, stale)


def _with_ref_columns(dataset: Dataset, chosen: torch.Tensor, rejected: torch.Tensor) -> Dataset:
    present = [c for c in REF_COLUMNS if c in dataset.column_names]
    if present:
        dataset = dataset.remove_columns(present)
    dataset = dataset.add_column(REF_COLUMNS[0], chosen.tolist())
    return dataset.add_column(REF_COLUMNS[1], rejected.tolist())


def attach_precomputed_reference(
    trainer: Any,
    recipe: Recipe | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int | None = None,
    model_name_or_path: str | None = None,
    free_reference: bool = True,
) -> CacheInfo:
    """Give a TRL 1.x ``DPOTrainer`` cached reference log-probs, so that training runs the policy only.

    Call it on a trainer built with ``precompute_ref_log_probs=False`` (so TRL does not compute them itself),
    before ``train()``. It adds the ``ref_chosen_logps`` / ``ref_rejected_logps`` columns to the train (and
    eval) dataset, from the cache or computed now (:func:`cached_reference_logps`), switches the trainer to
    read them (``trainer.precompute_ref_logps = True``, as TRL's own precompute does), routes later
    ``evaluate(new_dataset)`` calls through the same cache, and drops a separate ``ref_model`` (frees its
    memory; with PEFT the reference is the policy's base, shared, so there is nothing to free).

    Where the log-probs came from is left on the trainer: ``trainer.reference_cache_info`` is the train split's
    :class:`CacheInfo`, ``trainer.reference_cache_by_split`` maps each split's name (``"train"``, ``"eval"`` or the
    eval dict's keys; ``"eval"`` again for a dataset given to ``evaluate``) to its latest :class:`CacheInfo`.

    Args:
        trainer (`DPOTrainer`): a TRL >= 1.0 ``DPOTrainer`` whose datasets are tokenized (any trainer after
            ``__init__``).
        recipe (`Recipe`, *optional*): the run's recipe (for the cache key).
        cache_dir (`str` or `Path`, *optional*): the cache folder; default ``$DPO_XPU_CACHE_DIR`` or
            ``~/.cache/dpo_xpu/reference-logps``.
        batch_size (`int`, *optional*): pairs per reference forward; default ``precompute_ref_batch_size`` or the
            train batch.
        model_name_or_path (`str`, *optional*): the base model's folder or hub id, for the key (default: the
            recipe's).
        free_reference (`bool`): set ``trainer.ref_model`` to ``None`` afterwards. Default ``True``.

    Returns:
        `CacheInfo`: the train split's (``hit``, ``path``, ``key``, ``rows``, ``seconds``, ``stale``).

    Raises:
        KeyError: the train dataset is not tokenized (no ``prompt_ids``/``chosen_ids``/``rejected_ids``).
        TypeError: the train dataset is not a map-style ``datasets.Dataset``.
    """
    from datasets import Dataset

    if not isinstance(trainer.train_dataset, Dataset):
        raise TypeError(
            f"precomputed reference log-probs need a map-style datasets.Dataset, found {type(trainer.train_dataset)}"
        )
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()

    def precompute(self: Any, dataset: Dataset, name: str, batch: int | None = None) -> Dataset:
        chosen, rejected, info = cached_reference_logps(
            self, dataset, cache_dir, recipe, batch_size or batch, name, model_name_or_path
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
        import torch

        trainer.ref_model = None
        gc.collect()
        for backend in ("cuda", "xpu"):
            module = getattr(torch, backend, None)
            if module is not None and module.is_available():
                module.empty_cache()
        logger.info("separate reference model freed: training reads the precomputed log-probs")
    trainer.reference_cache_info = by_split["train"]
    return trainer.reference_cache_info
