"""The device a run trains on: ``select_device("auto")`` picks xpu, then cuda, then cpu (torch is imported inside
the functions, so that asking costs nothing until a device is needed)."""

from __future__ import annotations

import logging
import re
from importlib import metadata
from typing import TYPE_CHECKING, Any

from dpo_xpu.distributed import device_for_rank
from dpo_xpu.errors import DeviceNotAvailableError
from dpo_xpu.recipes import DEVICE_PATTERN

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

XPU_WHEELS = "pip install torch --index-url https://download.pytorch.org/whl/xpu"


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
            is out of range, or ``device`` is not a valid choice.
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
        return torch.device("cpu")
    count = device_count(kind)
    if count == 0:
        raise DeviceNotAvailableError(missing_device_message(kind))
    if index is not None and int(index) >= count:
        raise DeviceNotAvailableError(
            f"device {device!r} asked for, but PyTorch sees {count} {kind} device(s) (indices 0..{count - 1})"
        )
    return torch.device(device_for_rank(kind, index, count))
