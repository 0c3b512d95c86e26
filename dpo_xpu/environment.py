"""Environment check: what this machine can run, and what to fix where it can't (the device itself:
:mod:`dpo_xpu.device`).

    >>> report = check_environment()          # versions, accelerators, oneAPI, backends, verdicts
    >>> print(report)                         # a readable table; report.to_dict() for environment.json

The check gathers facts into a :class:`Probe` and judges them with the pure function :func:`_verdicts`, so the
judgement is tested with fake probes on any machine.
"""

from __future__ import annotations

import logging
import os
import platform as _platform
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import TYPE_CHECKING, Any, Literal

from packaging.requirements import Requirement
from packaging.version import InvalidVersion, Version

from dpo_xpu.device import XPU_WHEELS, device_count, import_torch
from dpo_xpu.errors import RecipeError
from dpo_xpu.recipes import BACKENDS

if TYPE_CHECKING:
    from dpo_xpu.recipes import Recipe
    from dpo_xpu.train.reference import ReferencePlan

logger = logging.getLogger(__name__)

PACKAGES = ("torch", "transformers", "trl", "peft", "bitsandbytes", "datasets", "accelerate")
IPEX = "intel-extension-for-pytorch"
INTEL_PACKAGES = (IPEX, "ipex-llm")
XPU_FIX = f"install the Intel GPU driver and PyTorch's XPU wheels: {XPU_WHEELS}"
ONEAPI_FIX = "source setup_oneapi.sh, then start Python or Jupyter from that shell"
BNB_FIX = 'pip install -U "bitsandbytes>=0.48"'
NATIVE_FIX = 'pip install -U "transformers>=4.53" "trl>=1.0" "peft>=0.17" "bitsandbytes>=0.48" "accelerate>=1.0"'
#: Intel Arc A-series names as PyTorch reports them ("Intel(R) Arc(TM) A770 Graphics"): 4 GiB per allocation.
ARC_A_SERIES = re.compile(r"\bArc\b.*\bA\d{3}", re.IGNORECASE)
IPEX_LLM_FIX = "conda env create -f environment-ipex-llm.yml (transformers 4.45.x, trl<0.12, accelerate>=0.26)"
#: What each backend needs, as requirement specifiers.
REQUIREMENTS = {
    "native": ("torch", "transformers>=4.53", "trl>=1.0", "peft", "accelerate", "bitsandbytes>=0.48"),
    "ipex-llm": ("torch", "transformers<4.46", "trl<0.12", "peft", "accelerate>=0.26", "ipex-llm"),
}


@dataclass
class Accelerator:
    """One device PyTorch sees: ``kind`` is ``"xpu"`` or ``"cuda"``, memory in MiB."""

    kind: str
    index: int
    name: str
    total_memory_mib: int


@dataclass
class Probe:
    """The raw facts the check judges (built by :func:`_probe`, or by hand in tests): installed versions (``None``:
    absent), the accelerators PyTorch sees, ``torch.version.xpu`` / ``.cuda``, ``ONEAPI_ROOT`` and
    ``SETVARS_COMPLETED`` where set, ``sycl-ls``'s Level Zero GPU lines (``None``: absent or failed)."""

    versions: dict[str, str | None] = field(default_factory=dict)
    accelerators: list[Accelerator] = field(default_factory=list)
    torch_xpu: str | None = None
    torch_cuda: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    sycl_ls: list[str] | None = None
    python: str = field(default_factory=_platform.python_version)
    platform: str = field(default_factory=_platform.platform)


@dataclass
class Verdict:
    """One judgement: ``level`` is ``"ok"``, ``"warning"`` or ``"error"``; ``fix`` says what to do."""

    level: Literal["ok", "warning", "error"]
    topic: str
    message: str
    fix: str = ""


@dataclass
class BackendStatus:
    """Whether a backend (``native`` or ``ipex-llm``) can run here; ``reasons`` say why not."""

    name: str
    usable: bool
    reasons: list[str] = field(default_factory=list)


@dataclass
class EnvironmentReport:
    """The result of :func:`check_environment`: facts, backend usability and verdicts for ``backend``."""

    backend: str
    probe: Probe
    backends: list[BackendStatus]
    verdicts: list[Verdict]

    @property
    def has_errors(self) -> bool:
        """`bool`: whether any verdict has level ``"error"``."""
        return any(v.level == "error" for v in self.verdicts)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (for ``runs/<name>/environment.json``)."""
        return {**asdict(self), "has_errors": self.has_errors}

    def to_table(self) -> str:
        """A plain-text table of everything the check found, verdicts last."""
        p = self.probe
        rows = ["dpo_xpu environment check", f"  python      {p.python} on {p.platform}", "packages"]
        rows += [f"  {name:<28}{p.versions.get(name) or 'not installed'}" for name in PACKAGES + INTEL_PACKAGES]
        rows.append(f"accelerators (torch.version.xpu={p.torch_xpu}, torch.version.cuda={p.torch_cuda})")
        devices = [f"  {a.kind}:{a.index}  {a.name}  {a.total_memory_mib} MiB" for a in p.accelerators]
        rows += devices or ["  none"]
        rows += ["oneAPI", f"  ONEAPI_ROOT                 {p.env.get('ONEAPI_ROOT', '(unset)')}"]
        rows.append(f"  setvars.sh sourced          {'yes' if _setvars_sourced(p) else 'no'}")
        sycl = "(not on PATH)" if p.sycl_ls is None else (f"{len(p.sycl_ls)} Level Zero GPU(s)")
        rows.append(f"  sycl-ls                     {sycl}")
        rows += [f"    {line}" for line in p.sycl_ls or []]
        rows.append(f"backends (checked: {self.backend})")
        for b in self.backends:
            rows.append(f"  {b.name:<10}{'usable' if b.usable else 'not usable: ' + '; '.join(b.reasons)}")
        rows.append("verdicts")
        for v in self.verdicts:
            rows.append(f"  [{v.level.upper():<7}] {v.topic}: {v.message}")
            rows += [f"            fix: {v.fix}"] if v.fix else []
        return "\n".join(rows)

    __str__ = to_table


def _version(text: str | None) -> Version | None:
    try:
        return Version(text) if text else None
    except InvalidVersion:
        return None


def _setvars_sourced(probe: Probe) -> bool:
    return probe.env.get("SETVARS_COMPLETED") == "1"


def _backend_status(name: str, probe: Probe) -> BackendStatus:
    """Judge one backend against the installed versions (:data:`REQUIREMENTS`; pure)."""
    reasons = []
    for req in map(Requirement, REQUIREMENTS[name]):
        found = probe.versions.get(req.name)
        have = _version(found)
        if not found:
            reasons.append(f"{req.name} is not installed")
        elif have is not None and not req.specifier.contains(have, prereleases=True):
            reasons.append(f"{name} needs {req}, found {found}")
    return BackendStatus(name, not reasons, reasons)


def _verdicts(probe: Probe, backend: str = "native") -> list[Verdict]:
    """Judge a probe for ``backend``, pure (no imports, no I/O): one :class:`Verdict` per finding."""
    out: list[Verdict] = []

    def add(level: str, topic: str, message: str, fix: str = "") -> None:
        out.append(Verdict(level, topic, message, fix))  # type: ignore[arg-type]

    ver = {k: _version(s) for k, s in probe.versions.items()}
    torch_v = probe.versions.get("torch")
    if probe.accelerators:
        names = ", ".join(f"{a.kind}:{a.index} {a.name}" for a in probe.accelerators)
        add("ok", "accelerator", f"training runs on {names}")
    else:
        build = " (a CPU-only build)" if torch_v and not (probe.torch_xpu or probe.torch_cuda) else ""
        sycl = " and sycl-ls lists no Level Zero GPU" if probe.sycl_ls == [] else ""
        msg = f"no accelerator visible to PyTorch {torch_v}{build}{sycl}: training runs on CPU, slowly"
        add("warning", "accelerator", msg, XPU_FIX)
    status = _backend_status(backend, probe)
    if status.usable:
        add("ok", "backend", f"the {backend} backend can run here")
    else:
        msg = f"the {backend} backend cannot run: {'; '.join(status.reasons)}"
        add("error", "backend", msg, NATIVE_FIX if backend == "native" else IPEX_LLM_FIX)
    bnb = ver.get("bitsandbytes")
    if backend == "native" and bnb is None:
        add("error", "bitsandbytes", "bitsandbytes is not installed: no NF4 quantisation", BNB_FIX)
    elif backend == "native" and bnb < Version("0.48"):
        level = "warning" if any(a.kind == "cuda" for a in probe.accelerators) else "error"
        msg = f"bitsandbytes {probe.versions['bitsandbytes']} has NF4 on CUDA only; CPU and XPU need >= 0.48"
        add(level, "bitsandbytes", msg, BNB_FIX)
    if ipex_llm := probe.versions.get("ipex-llm"):
        msg = f"ipex-llm {ipex_llm} was archived upstream on 2026-01-28: no more fixes, security fixes included"
        add("warning", "ipex-llm", msg, "prefer the native backend (PyTorch XPU + bitsandbytes) for new work")
        if not _setvars_sourced(probe):
            msg = "ipex-llm is installed but oneAPI's setvars.sh was not sourced in this shell"
            add("warning", "oneapi", msg, ONEAPI_FIX)
        else:
            add("ok", "oneapi", f"oneAPI set up from {probe.env.get('ONEAPI_ROOT', '?')}")
    ipex, ipex_text = ver.get(IPEX), probe.versions.get(IPEX)
    if ipex is not None:
        msg = f"{IPEX} {ipex_text} is discontinued after 2.8 (no further releases)"
        add("warning", IPEX, msg, "the native backend needs only PyTorch's XPU wheels")
        torch_ver = ver.get("torch")
        if torch_ver is not None and ipex.release[:2] != torch_ver.release[:2]:
            mm = ".".join(map(str, ipex.release[:2]))
            msg = f"{IPEX} {ipex_text} does not match torch {torch_v}: their major.minor must agree"
            fix = f"install the matching pair: pip install torch=={mm}.* {IPEX}=={mm}.*"
            add("error", "ipex-torch-pair", msg, fix)
    return out


def _installed(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _sycl_ls(timeout: float = 30.0) -> list[str] | None:
    """Level Zero GPU lines of ``sycl-ls``; ``None`` when it is not on PATH or fails."""
    exe = shutil.which("sycl-ls")
    if exe is None:
        return None
    try:
        res = subprocess.run([exe], capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        logger.warning("sycl-ls failed: %s", exc)
        return None
    lines = [line.strip() for line in res.stdout.splitlines()]
    return [line for line in lines if "level_zero" in line.lower() and "gpu" in line.lower()]


def _probe() -> Probe:
    """Gather the facts about this machine (imports torch; runs ``sycl-ls`` when it is on PATH)."""
    probe = Probe(versions={name: _installed(name) for name in PACKAGES + INTEL_PACKAGES})
    probe.env = {k: os.environ[k] for k in ("ONEAPI_ROOT", "SETVARS_COMPLETED") if k in os.environ}
    probe.sycl_ls = _sycl_ls()
    if probe.versions["torch"] is None:
        return probe
    try:
        torch = import_torch()
    except Exception as exc:
        logger.warning("torch is installed but failed to import: %s", exc)
        return probe
    probe.torch_xpu = getattr(torch.version, "xpu", None)
    probe.torch_cuda = torch.version.cuda
    for kind in ("xpu", "cuda"):
        try:
            for i in range(device_count(kind)):
                props = getattr(torch, kind).get_device_properties(i)
                probe.accelerators.append(Accelerator(kind, i, str(props.name), int(props.total_memory) // 2**20))
        except Exception as exc:  # a broken driver must not break the check
            logger.warning("could not query %s devices: %s", kind, exc)
    return probe


def check_environment(
    backend: str | None = None, recipe: Recipe | None = None, plan: ReferencePlan | None = None
) -> EnvironmentReport:
    """Check this machine for DPO training: stack versions, accelerators, oneAPI, backends, with fixes.

    Args:
        backend: ``"native"`` or ``"ipex-llm"``; default ``"ipex-llm"`` where it is installed, else
            ``recipe.backend`` or ``"native"``.
        recipe: add a ``memory`` verdict: whether it is expected to fit the device it would train on
            (:func:`dpo_xpu.train.memory.recipe_fits`; the host's RAM for a CPU run). The ``bf16`` verdict says
            whether the run computes in bfloat16 there and why (``bf16: auto`` without a recipe).
        plan: the run's reference plan, for that verdict (default ``recipe_fits``'s).

    Returns:
        An :class:`EnvironmentReport`: print it for a table; ``.verdicts``, ``.has_errors``, ``.to_dict()``.

    Raises:
        RecipeError: an unknown ``backend``.
    """
    if backend is not None and backend not in BACKENDS:
        raise RecipeError(f"backend must be one of {list(BACKENDS)}, found {backend!r}")
    probe = _probe()
    backend = backend or ("ipex-llm" if probe.versions.get("ipex-llm") else recipe.backend if recipe else "native")
    statuses = [_backend_status(name, probe) for name in BACKENDS]
    report = EnvironmentReport(backend, probe, statuses, _verdicts(probe, backend))
    report.verdicts.append(_bf16_verdict(*((recipe.bf16, recipe.device) if recipe else ("auto", "auto")), probe))
    if recipe is not None:
        report.verdicts.append(_memory_verdict(recipe, probe, plan))
    for verdict in report.verdicts:
        logger.debug("%s %s: %s", verdict.level, verdict.topic, verdict.message)
    return report


def _target(device: str, probe: Probe) -> Accelerator | None:
    """The accelerator a run on ``device`` would train on (the first of its kind); ``None``: the CPU."""
    kind = device.split(":")[0]
    return next((a for a in probe.accelerators if kind in ("auto", a.kind)), None)


def _bf16_verdict(bf16: bool | str, device: str, probe: Probe) -> Verdict:
    """Whether a run with the recipe's ``bf16`` and ``device`` computes in bfloat16 on the device it would train
    on, and why; a warning where ``bf16: true`` asks a device to emulate it."""
    from dpo_xpu.device import use_bf16

    target = _target(device, probe)
    device = f"{target.kind}:{target.index}" if target is not None else "cpu"
    try:
        on, why = use_bf16(bf16, device)
        native = use_bf16("auto", device)[0]
    except Exception as exc:  # a broken driver must not break the check
        return Verdict("warning", "bf16", f"cannot tell whether {device} computes bf16 natively: {exc}")
    if on and not native:
        return Verdict("warning", "bf16", why, "set bf16: auto (float32 here): emulated bf16 is several times slower")
    return Verdict("ok", "bf16", why)


def _memory_verdict(recipe: Recipe, probe: Probe, plan: ReferencePlan | None = None) -> Verdict:
    """Whether ``recipe`` is expected to fit the memory of the device it would train on."""
    from dpo_xpu.errors import DpoXpuError
    from dpo_xpu.train.memory import ARC_A_SERIES_MAX_ALLOCATION_MIB, recipe_fits

    target = _target(recipe.device, probe)
    if target is not None:
        where, memory_mib = f"{target.kind}:{target.index} ({target.name})", float(target.total_memory_mib)
    else:
        where, memory_mib = "the CPU (host memory)", os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    try:
        fit = recipe_fits(recipe, memory_mib, plan=plan)
    except DpoXpuError as exc:
        return Verdict("warning", "memory", f"cannot estimate the memory of {recipe.model_name_or_path}: {exc}")
    largest = fit.estimate.largest_allocation_mib
    if target is not None and ARC_A_SERIES.search(target.name) and largest > ARC_A_SERIES_MAX_ALLOCATION_MIB:
        message = (
            f"the largest single allocation, the {fit.estimate.largest_allocation}, is about {largest:,.0f} MiB: "
            f"more than the {ARC_A_SERIES_MAX_ALLOCATION_MIB:,} MiB an Arc A-series card allocates in one piece "
            "(intel/intel-extension-for-pytorch #325), whatever its total memory"
        )
        fix = "lower max_length or per_device_train_batch_size (with more gradient_accumulation_steps)"
    elif fit.fits:
        return Verdict("ok", "memory", f"on {where}: {fit.message}")
    else:
        message = fit.message
        fix = "change the recipe as the message says (docs/troubleshooting.md: out of device memory)"
    return Verdict("warning", "memory", f"on {where}: {message}", fix)
