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
  (a digest of the local weight files, or the hub id and commit), the model config and quantization, the
  compute dtype and autocast, the device type, the tokenizer and its chat template, the tokenized rows in
  order, ``max_length``, ``truncation_mode``, ``max_prompt_length``, and the TRL, torch and bitsandbytes
  versions;
- the file is ``<cache_dir>/<key>.safetensors`` (two float32 tensors of shape ``(rows,)``) with the key, the
  row count and a sha256 of the tensor bytes in its header, written to a temporary file and renamed into
  place; a file that is truncated, fails its checksum or has the wrong key or shape is rebuilt with a
  warning, never used.

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
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpo_xpu.train.trl_internals import route_reference_precompute

if TYPE_CHECKING:
    import torch
    from datasets import Dataset

    from dpo_xpu.recipes import Recipe

logger = logging.getLogger(__name__)

#: Bumped when the file layout or the key's meaning changes; part of the key.
FORMAT_VERSION = 1
#: Environment variable naming the cache folder (default ``~/.cache/dpo_xpu/reference-logps``).
CACHE_DIR_ENV = "DPO_XPU_CACHE_DIR"
#: The tokenized columns TRL 1.x's ``DPOTrainer`` gives every row; the reference log-probs depend on them.
TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


@dataclass
class CacheInfo:
    """What :func:`attach_precomputed_reference` did for one dataset.

    Args:
        hit: the cached file was valid and used (``False``: computed now and written).
        path: the cache file, ``<cache_dir>/<key>.safetensors``.
        key: the sha256 hex digest of :attr:`components`.
        rows: pairs covered (the dataset's length).
        seconds: wall time to load (hit) or compute and write (miss).
        rebuilt: a file was present but invalid (truncated, bad checksum, wrong key or shape) and was rebuilt.
        components: the values the key was computed from (also written beside the file as ``<key>.json``).
    """

    hit: bool
    path: Path
    key: str
    rows: int
    seconds: float
    rebuilt: bool = False
    components: dict[str, Any] = field(default_factory=dict)


class CacheFileError(ValueError):
    """A cache file is unreadable, truncated, fails its checksum, or belongs to another key or row count."""


def default_cache_dir() -> Path:
    """``$DPO_XPU_CACHE_DIR`` if set, else ``~/.cache/dpo_xpu/reference-logps``."""
    env = os.environ.get(CACHE_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dpo_xpu" / "reference-logps"


def _sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def weights_digest(model_name_or_path: str | Path, revision: str | None = None, memo_dir: Path | None = None) -> str:
    """Identify a model's weights.

    A local folder gets the sha256 over its weight files (``*.safetensors``, ``*.bin``, ``*.pt``, ``*.gguf``;
    names and bytes, in name order). Reading 14 GB takes tens of seconds, so the digest is remembered in
    ``<memo_dir>/weights-digests.json`` against each file's size and modification time and recomputed only
    when one changes. A hub id gives ``"hub:<id>@<revision>"`` (the commit the weights were loaded from).

    Args:
        model_name_or_path: a local folder or a hub id.
        revision: the hub commit (``model.config._commit_hash``); ignored for a local folder.
        memo_dir: where to remember digests of local folders; ``None`` remembers nothing.

    Returns:
        ``"sha256:<hex>"`` for a folder, ``"hub:<id>@<revision>"`` for a hub id.

    Raises:
        ValueError: a local folder without any weight file.
    """
    path = Path(model_name_or_path).expanduser()
    if not path.exists():
        return f"hub:{model_name_or_path}@{revision or 'unknown'}"
    files = sorted(p for p in (path.iterdir() if path.is_dir() else [path]) if p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise ValueError(f"{path} holds no weight file ({', '.join(WEIGHT_SUFFIXES)}): cannot identify the model")
    stats = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    memo_key = _sha256_json([str(path.resolve()), stats])
    memo_file = memo_dir / "weights-digests.json" if memo_dir is not None else None
    memo: dict[str, str] = {}
    if memo_file is not None and memo_file.is_file():
        try:
            memo = json.loads(memo_file.read_text())
        except (OSError, ValueError):
            memo = {}
        if memo_key in memo:
            return memo[memo_key]
    from tqdm.auto import tqdm

    h = hashlib.sha256()
    with tqdm(total=sum(s[1] for s in stats), unit="B", unit_scale=True, desc="Hashing model weights") as bar:
        for p in files:
            h.update(p.name.encode())
            with p.open("rb") as handle:
                while chunk := handle.read(1 << 24):
                    h.update(chunk)
                    bar.update(len(chunk))
    digest = "sha256:" + h.hexdigest()
    if memo_file is not None:
        memo[memo_key] = digest
        _atomic_write_bytes(memo_file, json.dumps(memo, indent=1).encode())
    return digest


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
    lengths = [
        len(p) + max(len(c), len(r))
        for p, c, r in zip(rows["prompt_ids"], rows["chosen_ids"], rows["rejected_ids"], strict=True)
    ]
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
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


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _tensor_sha256(chosen: torch.Tensor, rejected: torch.Tensor) -> str:
    h = hashlib.sha256(chosen.contiguous().numpy().tobytes())
    h.update(rejected.contiguous().numpy().tobytes())
    return h.hexdigest()


def save_reference_logps(
    path: str | Path, chosen: torch.Tensor, rejected: torch.Tensor, key: str, components: dict[str, Any]
) -> Path:
    """Write the cache file atomically (temporary file + rename) with its key, row count and checksum.

    Args:
        path: the ``.safetensors`` file to write; ``<stem>.json`` beside it gets ``components`` (for people).
        chosen, rejected: float32 tensors of shape ``(rows,)``.
        key: the cache key, stored in the header and checked on load.
        components: what the key was computed over.

    Returns:
        ``path``.
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
    data = save({REF_COLUMNS[0]: chosen, REF_COLUMNS[1]: rejected}, metadata=metadata)
    _atomic_write_bytes(path.with_suffix(".json"), json.dumps(components, indent=1, default=str).encode())
    _atomic_write_bytes(path, data)
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

    Args:
        trainer: a TRL 1.x ``DPOTrainer``.
        dataset: its TRL-tokenized rows (``trainer.train_dataset`` or an eval split).
        cache_dir: the cache folder; default :func:`default_cache_dir`.
        recipe: the run's recipe (optional; see :func:`reference_cache_key`).
        batch_size: pairs per reference forward; default ``args.precompute_ref_batch_size`` or
            ``args.per_device_train_batch_size``.
        name: the split's name, for messages.
        model_name_or_path: the base model's folder or hub id (see :func:`reference_cache_key`).

    Returns:
        ``(ref_chosen_logps, ref_rejected_logps, info)``; tensors float32 of shape ``(len(dataset),)``.
    """
    start = time.perf_counter()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key, components = reference_cache_key(trainer, dataset, recipe, model_name_or_path, memo_dir=cache_dir)
    path = cache_dir / f"{key}.safetensors"
    rebuilt = False
    if path.exists():
        try:
            chosen, rejected = load_reference_logps(path, key, len(dataset))
        except CacheFileError as exc:
            logger.warning("reference log-prob cache %s is invalid (%s): recomputing it", path, exc)
            rebuilt = True
        else:
            logger.info("reference log-probs for %s (%d pairs) loaded from %s", name, len(dataset), path)
            info = CacheInfo(True, path, key, len(dataset), time.perf_counter() - start, False, components)
            return chosen, rejected, info
    args = trainer.args
    batch_size = batch_size or args.precompute_ref_batch_size or args.per_device_train_batch_size
    chosen, rejected = compute_reference_logps(trainer, dataset, batch_size, desc=f"Reference log-probs ({name})")
    save_reference_logps(path, chosen, rejected, key, components)
    logger.info("reference log-probs for %s (%d pairs) computed and cached in %s", name, len(dataset), path)
    info = CacheInfo(False, path, key, len(dataset), time.perf_counter() - start, rebuilt, components)
    return chosen, rejected, info


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

    Args:
        trainer: a TRL >= 1.0 ``DPOTrainer`` whose datasets are tokenized (any trainer after ``__init__``).
        recipe: the run's recipe (for the cache key; optional).
        cache_dir: the cache folder; default ``$DPO_XPU_CACHE_DIR`` or ``~/.cache/dpo_xpu/reference-logps``.
        batch_size: pairs per reference forward; default ``precompute_ref_batch_size`` or the train batch.
        model_name_or_path: the base model's folder or hub id, for the key (default: the recipe's).
        free_reference: set ``trainer.ref_model`` to ``None`` afterwards. Default ``True``.

    Returns:
        The :class:`CacheInfo` of the train split (``hit``, ``path``, ``key``, ``rows``, ``seconds``).

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
        self.reference_cache_info[name] = info
        return _with_ref_columns(dataset, chosen, rejected)

    trainer.reference_cache_info = {}
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
    return trainer.reference_cache_info["train"]
