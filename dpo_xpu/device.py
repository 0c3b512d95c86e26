"""The device a run trains on: ``select_device("auto")`` picks xpu, then cuda, then cpu (torch is imported inside
the functions, so that asking costs nothing until a device is needed), and whether it computes in bfloat16
(:func:`use_bf16`: ``bf16: auto``). No library says whether a CPU runs bf16 natively (PyTorch's
``get_cpu_capability`` names the vector width, not the bf16 instructions), hence the flags read here."""

from __future__ import annotations

import logging
import re
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpo_xpu.distributed import device_for_rank
from dpo_xpu.errors import DeviceNotAvailableError, RecipeError
from dpo_xpu.recipes import DEVICE_PATTERN

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

XPU_WHEELS = "pip install torch --index-url https://download.pytorch.org/whl/xpu"
#: ``/proc/cpuinfo`` flags of the CPU instructions that compute bf16 natively (oneDNN's bf16 matmuls), best first.
CPU_BF16_FLAGS = (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16"))


def _ipex_installed() -> bool:
    try:
        metadata.version("intel-extension-for-pytorch")
    except metadata.PackageNotFoundError:
        return False
    return True


def import_torch() -> Any:
    """Import torch, and intel-extension-for-pytorch where torch has no ``torch.xpu`` (torch < 2.4)."""
    import torch

    if not hasattr(torch, "xpu") and _ipex_installed():
        try:
            import intel_extension_for_pytorch  # noqa: F401
        except Exception as exc:  # a broken ipex must not break the check
            logger.warning("intel_extension_for_pytorch failed to import: %s", exc)
    return torch


def device_count(kind: str) -> int:
    """How many ``kind`` (``"xpu"``/``"cuda"``) devices PyTorch sees; 0 when it has no such support."""
    torch = import_torch()
    mod = getattr(torch, kind, None)
    if mod is None or not mod.is_available():
        return 0
    return int(mod.device_count())


def missing_device_message(kind: str) -> str:
    """The one-line error for an absent ``kind`` (``"xpu"`` or ``"cuda"``) device: what PyTorch build is installed,
    and how to install the driver and wheels that see one."""
    import torch

    version = torch.__version__
    if kind == "xpu":
        build = " (a build without XPU support: torch.version.xpu is None)"
        build = build if getattr(torch.version, "xpu", None) is None else ""
        return (
            f"no Intel GPU (XPU) is visible to PyTorch {version}{build}: install the Intel GPU driver and "
            f"PyTorch's XPU wheels ({XPU_WHEELS}), check `sycl-ls` lists a Level Zero GPU, "
            "or run with device='cpu'"
        )
    build = " (a build without CUDA support: torch.version.cuda is None)"
    build = build if torch.version.cuda is None else ""
    return (
        f"no NVIDIA GPU (CUDA) is visible to PyTorch {version}{build}: install the NVIDIA driver and a CUDA "
        "build of PyTorch (pip install torch --index-url https://download.pytorch.org/whl/cu128), "
        "or run with device='cpu'"
    )


def select_device(device: str = "auto") -> torch.device:
    """Pick the torch device to train on: ``"auto"`` (xpu, then cuda, then cpu), or ``"xpu"``, ``"cuda"``, ``"cpu"``,
    optionally with an index (``"xpu:0"``); under several processes an accelerator is ``kind:LOCAL_RANK``
    (:func:`dpo_xpu.distributed.device_for_rank`).

    Raises:
        DeviceNotAvailableError: the device is not visible to PyTorch (the message says how to fix it), its index
            is out of range (a CPU's is 0), or ``device`` is not a valid choice.
    """
    import torch

    match = re.fullmatch(DEVICE_PATTERN, str(device).strip().lower())
    if match is None or (match[1] == "auto" and match[2] is not None):
        raise DeviceNotAvailableError(
            "device must be 'auto', 'cpu', 'xpu' or 'cuda', optionally with an index ('xpu:0', 'cuda:1'), "
            f"found {device!r}"
        )
    kind, index = match[1], match[2]
    if kind == "auto":
        for candidate in ("xpu", "cuda"):
            if (found := device_count(candidate)) > 0:
                logger.info("select_device('auto') picked %s", candidate)
                return torch.device(device_for_rank(candidate, None, found))
        logger.info("select_device('auto'): no xpu or cuda device, using cpu")
        return torch.device("cpu")
    if kind == "cpu":
        if index not in (None, "0"):
            raise DeviceNotAvailableError(f"device {device!r}: PyTorch has one CPU device, 'cpu' (or 'cpu:0')")
        return torch.device("cpu")
    count = device_count(kind)
    if count == 0:
        raise DeviceNotAvailableError(missing_device_message(kind))
    if index is not None and int(index) >= count:
        raise DeviceNotAvailableError(
            f"device {device!r} asked for, but PyTorch sees {count} {kind} device(s) (indices 0..{count - 1})"
        )
    return torch.device(device_for_rank(kind, index, count))


def cpu_bf16_instructions(cpuinfo: str | None = None) -> str | None:
    """The CPU's native bf16 instructions, ``"AMX"`` or ``"AVX512-BF16"`` (:data:`CPU_BF16_FLAGS`), or ``None``
    where bf16 is emulated or nothing says (no ``/proc/cpuinfo``: not Linux).

    Args:
        cpuinfo: the text of ``/proc/cpuinfo`` (default: read it).
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None
    flags = {flag for line in cpuinfo.splitlines() if line.startswith("flags") for flag in line.split()}
    return next((name for flag, name in CPU_BF16_FLAGS if flag in flags), None)


def use_bf16(bf16: bool | str, device: torch.device | str, cpuinfo: str | None = None) -> tuple[bool, str]:
    """Whether a run on ``device`` computes in bfloat16, and why (one line): the one place ``bf16: auto`` is decided.

    ``true`` and ``false`` are kept. ``auto``: on for xpu and cuda where ``torch.<kind>.is_bf16_supported()``, and
    on CPUs with AMX or AVX512-BF16 (:func:`cpu_bf16_instructions`); off where bf16 would be emulated, which on a
    CPU without them runs about 6x slower than float32 (9.5 against 1.6 s per step, stories260K, 2 cores).

    Args:
        bf16: the recipe's ``bf16``: ``True``, ``False`` or ``"auto"``.
        device: the run's device (:func:`select_device`).
        cpuinfo: for a CPU, the text of ``/proc/cpuinfo`` (default: read it).

    Raises:
        RecipeError: ``bf16`` is none of those.
    """
    if not (isinstance(bf16, bool) or bf16 == "auto"):
        raise RecipeError(f"bf16: {bf16!r} is not one of auto, true, false")
    kind = str(device).split(":")[0]
    if kind == "cpu":
        found = cpu_bf16_instructions(cpuinfo)
        native = found is not None
        fact = f"this CPU has {found}" if native else "this CPU has no AVX512-BF16 or AMX: bf16 would be emulated"
    else:
        check = getattr(getattr(import_torch(), kind, None), "is_bf16_supported", None)
        native = bool(check()) if check is not None else kind == "xpu"
        fact = f"{kind} {'supports' if native else 'does not support'} bf16 (torch.{kind}.is_bf16_supported())"
    if bf16 == "auto":
        return native, f"bf16: auto is {'on' if native else 'off (float32)'}: {fact}"
    return bf16, f"bf16: {str(bf16).lower()} in the recipe ({fact})"


def compute_dtype(bf16: bool | str, device: torch.device | str) -> torch.dtype:
    """``torch.bfloat16`` where :func:`use_bf16` says a run on ``device`` (a device, or a recipe's ``device`` value,
    resolved by :func:`select_device` for ``bf16: auto``) computes in bf16, else ``torch.float32``."""
    torch = import_torch()
    if bf16 == "auto" and not isinstance(device, torch.device):
        device = select_device(device)
    return torch.bfloat16 if use_bf16(bf16, device)[0] else torch.float32
