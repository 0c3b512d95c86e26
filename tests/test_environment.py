"""dpo_xpu.device and dpo_xpu.environment: device selection (monkeypatched probes), the environment verdicts."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import QWEN05

import dpo_xpu.device as device_module
import dpo_xpu.environment as env
from dpo_xpu.device import select_device
from dpo_xpu.environment import (
    Accelerator,
    EnvironmentReport,
    Probe,
    Verdict,
    check_environment,
)
from dpo_xpu.errors import DeviceNotAvailableError, RecipeError

NATIVE = {
    "torch": "2.8.0+xpu",
    "transformers": "4.56.0",
    "trl": "1.0.0",
    "peft": "0.17.1",
    "bitsandbytes": "0.48.1",
    "datasets": "4.0.0",
    "accelerate": "1.10.0",
    "intel-extension-for-pytorch": None,
    "ipex-llm": None,
}
IPEX_LLM = {
    **NATIVE,
    "torch": "2.1.0a0+cxx11.abi",
    "transformers": "4.45.2",
    "trl": "0.11.4",
    "accelerate": "0.33.0",
    "bitsandbytes": None,
    "intel-extension-for-pytorch": "2.1.10+xpu",
    "ipex-llm": "2.2.0",
}
ARC = Accelerator("xpu", 0, "Intel(R) Arc(TM) A770 Graphics", 16225)


def _probe(versions: dict | None = None, accelerators: list | None = None, **kw) -> Probe:
    return Probe(versions=dict(versions or NATIVE), accelerators=list(accelerators or []), **kw)


def _find(verdicts: list[Verdict], topic: str) -> Verdict:
    found = [v for v in verdicts if v.topic == topic]
    assert len(found) == 1, f"expected one {topic!r} verdict, got {verdicts}"
    return found[0]


def _topics(verdicts: list[Verdict]) -> set[str]:
    return {v.topic for v in verdicts}


# select_device ----------------------------------------------------------------------------------------------


def _devices(monkeypatch: pytest.MonkeyPatch, xpu: int = 0, cuda: int = 0) -> None:
    monkeypatch.setattr(device_module, "device_count", lambda kind: {"xpu": xpu, "cuda": cuda}[kind])


@pytest.mark.parametrize(("xpu", "cuda", "expected"), [(1, 1, "xpu"), (2, 0, "xpu"), (0, 1, "cuda"), (0, 0, "cpu")])
def test_auto_prefers_xpu_then_cuda_then_cpu(monkeypatch, xpu, cuda, expected) -> None:
    _devices(monkeypatch, xpu=xpu, cuda=cuda)
    assert select_device("auto") == torch.device(expected)
    assert select_device() == torch.device(expected)


def test_explicit_devices_and_indices(monkeypatch) -> None:
    _devices(monkeypatch, xpu=2, cuda=2)
    assert select_device("xpu") == torch.device("xpu")
    assert select_device("XPU:1") == torch.device("xpu", 1)
    assert select_device(" cuda:0 ") == torch.device("cuda", 0)


def test_index_out_of_range(monkeypatch) -> None:
    _devices(monkeypatch, xpu=1)
    with pytest.raises(DeviceNotAvailableError, match=r"sees 1 xpu device\(s\)"):
        select_device("xpu:1")


def test_explicit_xpu_absent_says_how_to_fix(monkeypatch) -> None:
    _devices(monkeypatch)
    with pytest.raises(DeviceNotAvailableError) as info:
        select_device("xpu")
    message = str(info.value)
    assert "XPU" in message and torch.__version__ in message
    assert "PyTorch's XPU wheels" in message and "download.pytorch.org/whl/xpu" in message
    assert "sycl-ls" in message and "device='cpu'" in message
    if getattr(torch.version, "xpu", None) is None:
        assert "torch.version.xpu is None" in message


def test_explicit_cuda_absent_says_how_to_fix(monkeypatch) -> None:
    _devices(monkeypatch, xpu=1)
    with pytest.raises(DeviceNotAvailableError, match="CUDA") as info:
        select_device("cuda:0")
    assert "device='cpu'" in str(info.value)


def test_cpu_always_works(monkeypatch) -> None:
    _devices(monkeypatch)
    assert select_device("cpu") == torch.device("cpu")
    assert select_device("cpu:0").type == "cpu"
    with pytest.raises(DeviceNotAvailableError, match="one CPU device"):
        select_device("cpu:5")


def test_real_machine_auto_and_explicit_absent() -> None:
    device = select_device("auto")
    assert device.type in {"xpu", "cuda", "cpu"}
    if not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        with pytest.raises(DeviceNotAvailableError, match="XPU"):
            select_device("xpu")


@pytest.mark.parametrize("bad", ["gpu", "mps", "auto:0", "xpu:-1", "", "cuda:x"])
def test_unknown_device_lists_the_choices(bad: str) -> None:
    with pytest.raises(DeviceNotAvailableError) as info:
        select_device(bad)
    assert all(choice in str(info.value) for choice in ("'auto'", "'cpu'", "'xpu'", "'cuda'"))
    assert repr(bad) in str(info.value)


# verdicts ---------------------------------------------------------------------------------------------------


def test_no_accelerator_warns_with_the_fix() -> None:
    verdict = _find(env._verdicts(_probe()), "accelerator")
    assert verdict.level == "warning"
    assert "training runs on CPU, slowly" in verdict.message
    assert "pip install torch --index-url https://download.pytorch.org/whl/xpu" in verdict.fix


def test_no_accelerator_mentions_cpu_only_build_and_empty_sycl_ls() -> None:
    verdict = _find(env._verdicts(_probe(sycl_ls=[])), "accelerator")
    assert "CPU-only build" in verdict.message and "sycl-ls lists no Level Zero GPU" in verdict.message
    verdict = _find(env._verdicts(_probe(torch_xpu="20250101")), "accelerator")
    assert "CPU-only" not in verdict.message


def test_accelerator_present_is_ok() -> None:
    verdicts = env._verdicts(_probe(accelerators=[ARC]))
    verdict = _find(verdicts, "accelerator")
    assert verdict.level == "ok" and "Arc" in verdict.message
    assert not any(v.level != "ok" for v in verdicts), verdicts


def test_clean_native_stack_has_no_errors() -> None:
    verdicts = env._verdicts(_probe(accelerators=[ARC]), "native")
    assert _find(verdicts, "backend").level == "ok"
    assert _topics(verdicts) == {"accelerator", "backend"}


@pytest.mark.parametrize("version", ["0.45.5", "0.47.0"])
def test_bitsandbytes_too_old_for_nf4_on_xpu_and_cpu(version: str) -> None:
    verdicts = env._verdicts(_probe({**NATIVE, "bitsandbytes": version}, [ARC]))
    verdict = _find(verdicts, "bitsandbytes")
    assert verdict.level == "error" and version in verdict.message
    assert verdict.fix == 'pip install -U "bitsandbytes>=0.48"'
    assert "bitsandbytes>=0.48" in _find(verdicts, "backend").message


def test_old_bitsandbytes_is_only_a_warning_on_cuda() -> None:
    cuda = Accelerator("cuda", 0, "NVIDIA H100", 81559)
    verdict = _find(env._verdicts(_probe({**NATIVE, "bitsandbytes": "0.45.0"}, [cuda])), "bitsandbytes")
    assert verdict.level == "warning"


def test_bitsandbytes_missing_is_an_error_for_native_only() -> None:
    verdict = _find(env._verdicts(_probe({**NATIVE, "bitsandbytes": None})), "bitsandbytes")
    assert verdict.level == "error" and "not installed" in verdict.message
    assert "bitsandbytes" not in _topics(env._verdicts(_probe(IPEX_LLM), "ipex-llm"))


def test_ipex_llm_installed_warns_it_is_archived() -> None:
    verdict = _find(env._verdicts(_probe(IPEX_LLM, [ARC]), "ipex-llm"), "ipex-llm")
    assert verdict.level == "warning"
    assert "archived" in verdict.message and "2026-01-28" in verdict.message and "security" in verdict.message


def test_ipex_installed_warns_it_is_discontinued() -> None:
    verdict = _find(env._verdicts(_probe(IPEX_LLM, [ARC]), "ipex-llm"), "intel-extension-for-pytorch")
    assert verdict.level == "warning" and "discontinued after 2.8" in verdict.message


def test_ipex_torch_mismatch_is_an_error_with_the_matching_pair() -> None:
    verdicts = env._verdicts(_probe({**IPEX_LLM, "torch": "2.3.1"}), "ipex-llm")
    verdict = _find(verdicts, "ipex-torch-pair")
    assert verdict.level == "error"
    assert "2.1.10+xpu" in verdict.message and "2.3.1" in verdict.message
    assert "torch==2.1.*" in verdict.fix and "intel-extension-for-pytorch==2.1.*" in verdict.fix


def test_ipex_torch_matching_pair_has_no_pair_error() -> None:
    assert "ipex-torch-pair" not in _topics(env._verdicts(_probe(IPEX_LLM), "ipex-llm"))


def test_oneapi_not_sourced_with_ipex_llm_warns_to_source_setup_oneapi() -> None:
    verdict = _find(env._verdicts(_probe(IPEX_LLM), "ipex-llm"), "oneapi")
    assert verdict.level == "warning" and "source setup_oneapi.sh" in verdict.fix
    sourced = _probe(IPEX_LLM, env={"SETVARS_COMPLETED": "1", "ONEAPI_ROOT": "/opt/intel/oneapi"})
    assert _find(env._verdicts(sourced, "ipex-llm"), "oneapi").level == "ok"
    assert "oneapi" not in _topics(env._verdicts(_probe(NATIVE), "native"))


def test_ipex_llm_stack_is_usable_for_ipex_llm_and_not_native() -> None:
    assert _find(env._verdicts(_probe(IPEX_LLM), "ipex-llm"), "backend").level == "ok"
    native = _find(env._verdicts(_probe(IPEX_LLM), "native"), "backend")
    assert native.level == "error"
    assert "transformers>=4.53" in native.message and "trl>=1.0" in native.message


@pytest.mark.parametrize(
    ("package", "version", "needs"),
    [
        ("transformers", "4.56.0", "transformers<4.46"),
        ("trl", "0.12.0", "trl<0.12"),
        ("accelerate", "0.25.0", None),
    ],
)
def test_ipex_llm_backend_rejects_incompatible_versions(package: str, version: str, needs: str | None) -> None:
    verdict = _find(env._verdicts(_probe({**IPEX_LLM, package: version}), "ipex-llm"), "backend")
    assert verdict.level == "error"
    assert (needs or "accelerate>=0.26") in verdict.message
    assert "environment-ipex-llm.yml" in verdict.fix


def test_native_backend_rejects_old_transformers_and_trl() -> None:
    verdict = _find(env._verdicts(_probe({**NATIVE, "transformers": "4.45.2", "trl": "0.9.6"})), "backend")
    assert verdict.level == "error"
    assert "found 4.45.2" in verdict.message and "found 0.9.6" in verdict.message


def test_backend_status_reports_missing_packages() -> None:
    status = env._backend_status("ipex-llm", _probe(NATIVE))
    assert not status.usable and "ipex-llm is not installed" in status.reasons
    assert env._backend_status("native", _probe(NATIVE)).usable


# the report -------------------------------------------------------------------------------------------------


def _report(probe: Probe, backend: str = "native") -> EnvironmentReport:
    statuses = [env._backend_status(name, probe) for name in env.BACKENDS]
    return EnvironmentReport(backend, probe, statuses, env._verdicts(probe, backend))


def test_to_dict_is_json_and_round_trips_key_fields() -> None:
    probe = _probe(IPEX_LLM, [ARC], sycl_ls=["[level_zero:gpu][level_zero:0] Intel(R) Arc(TM) A770"])
    report = _report(probe, "ipex-llm")
    data = json.loads(json.dumps(report.to_dict()))
    assert data["backend"] == "ipex-llm"
    assert data["probe"]["versions"] == IPEX_LLM
    assert data["probe"]["accelerators"][0] == {
        "kind": "xpu",
        "index": 0,
        "name": ARC.name,
        "total_memory_mib": 16225,
    }
    assert [Verdict(**v) for v in data["verdicts"]] == report.verdicts
    assert data["has_errors"] is report.has_errors is False
    assert {b["name"]: b["usable"] for b in data["backends"]} == {"native": False, "ipex-llm": True}


def test_has_errors() -> None:
    assert _report(_probe({**NATIVE, "bitsandbytes": "0.44.0"})).has_errors
    assert not _report(_probe(NATIVE)).has_errors


def test_table_lists_versions_devices_and_verdicts() -> None:
    report = _report(_probe(accelerators=[ARC], env={"ONEAPI_ROOT": "/opt/intel/oneapi"}))
    table = str(report)
    assert table == report.to_table()
    for name, version in NATIVE.items():
        assert name in table
        assert (version or "not installed") in table
    assert "xpu:0" in table and "16225 MiB" in table and "/opt/intel/oneapi" in table
    assert "[OK     ] accelerator" in table
    warned = str(_report(_probe()))
    assert "[WARNING] accelerator" in warned and "fix: install the Intel GPU driver" in warned


def test_check_environment_on_this_machine() -> None:
    report = check_environment()
    assert report.probe.versions["torch"] == torch.__version__  # the installed distribution's version
    assert report.backend == ("ipex-llm" if report.probe.versions["ipex-llm"] else "native")
    assert json.loads(json.dumps(report.to_dict()))["probe"]["versions"]["torch"] == torch.__version__
    assert torch.__version__ in str(report)
    sees_accelerator = any(
        getattr(torch, kind, None) is not None and getattr(torch, kind).is_available() for kind in ("xpu", "cuda")
    )
    accelerator = _find(report.verdicts, "accelerator")
    if sees_accelerator:
        assert accelerator.level == "ok" and report.probe.accelerators
    else:
        assert accelerator.level == "warning" and "training runs on CPU, slowly" in accelerator.message
        assert report.probe.accelerators == []


def test_check_environment_rejects_unknown_backend() -> None:
    with pytest.raises(RecipeError, match="'native', 'ipex-llm'"):
        check_environment("vllm")


def test_sycl_ls_absent_and_present(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert env._sycl_ls() is None
    fake = tmp_path / "sycl-ls"
    fake.write_text(
        "#!/bin/sh\n"
        "echo '[opencl:cpu][opencl:0] Intel(R) OpenCL, Intel(R) Core(TM) i9'\n"
        "echo '[level_zero:gpu][level_zero:0] Intel(R) Level-Zero, Intel(R) Arc(TM) A770 Graphics 1.3'\n"
    )
    fake.chmod(0o755)
    assert env._sycl_ls() == ["[level_zero:gpu][level_zero:0] Intel(R) Level-Zero, Intel(R) Arc(TM) A770 Graphics 1.3"]


def _stories_recipe(stories260k_path, **overrides):
    from dpo_xpu.recipes import Recipe

    values = dict(model_name_or_path=str(stories260k_path), max_length=1024, max_prompt_length=512, bf16=False)
    return Recipe(**{**values, **overrides})


def test_memory_verdict_fits_the_host_for_a_cpu_run(stories260k_path) -> None:
    verdict = env._memory_verdict(_stories_recipe(stories260k_path, device="cpu"), _probe())
    assert verdict.level == "ok" and "host memory" in verdict.message and "fits" in verdict.message


def test_memory_verdict_uses_the_accelerator_the_recipe_trains_on(stories260k_path) -> None:
    tiny_gpu = Accelerator("xpu", 0, "Intel(R) Arc(TM) A770 Graphics", total_memory_mib=16)
    verdict = env._memory_verdict(_stories_recipe(stories260k_path, device="auto"), _probe(accelerators=[tiny_gpu]))
    assert verdict.level == "warning"
    assert "xpu:0 (Intel(R) Arc(TM) A770 Graphics)" in verdict.message and "does not fit" in verdict.message
    assert "troubleshooting" in verdict.fix


def test_memory_verdict_without_a_config_says_it_cannot_estimate(tmp_path) -> None:
    from dpo_xpu.recipes import Recipe

    verdict = env._memory_verdict(Recipe(model_name_or_path=str(tmp_path / "absent"), device="cpu"), _probe())
    assert verdict.level == "warning" and verdict.message.startswith("cannot estimate")


def test_check_environment_adds_the_memory_verdict_only_with_a_recipe(stories260k_path) -> None:
    assert "memory" not in _topics(env.check_environment().verdicts)
    report = env.check_environment(recipe=_stories_recipe(stories260k_path, device="cpu"))
    assert _find(report.verdicts, "memory").level == "ok"
    assert json.loads(json.dumps(report.to_dict()))["verdicts"][-1]["topic"] == "memory"


QWEN2_05B_CONFIG = {"model_type": "qwen2", **QWEN05}  # as a config.json: the planner reads its dimensions


@pytest.mark.parametrize(
    ("backend", "card", "warned"),
    [
        ("ipex-llm", "Intel(R) Arc(TM) A770 Graphics", True),  # TRL 0.11: full logits, 4.6 GiB in one tensor
        ("native", "Intel(R) Arc(TM) A770 Graphics", False),  # TRL 1.x: tiles of at most 512 MiB
        ("ipex-llm", "Intel(R) Data Center GPU Max 1550", False),  # no 4 GiB limit on Max
    ],
)
def test_memory_verdict_warns_of_arc_a_series_4gb_allocation_limit(tmp_path, backend, card, warned) -> None:
    from dpo_xpu.recipes import Recipe

    (tmp_path / "config.json").write_text(json.dumps(QWEN2_05B_CONFIG))
    recipe = Recipe(
        model_name_or_path=str(tmp_path), backend=backend, device="xpu", per_device_train_batch_size=4, max_length=1024
    )
    gpu = Accelerator("xpu", 0, card, total_memory_mib=64 * 1024)
    verdict = env._memory_verdict(recipe, _probe(accelerators=[gpu]))
    assert ("4,096 MiB an Arc A-series card allocates in one piece" in verdict.message) is warned
    assert verdict.level == ("warning" if warned else "ok")
    if warned:
        assert "full logits, is about 4,748 MiB" in verdict.message and "max_length" in verdict.fix
