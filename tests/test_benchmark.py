"""``benchmarks/dpo_step.py`` end to end on a tiny Qwen2 model (seconds), and its JSON schema."""

from __future__ import annotations

import importlib.util
import json
import math
import sys

import pytest
from conftest import PROJECT_ROOT, require_orca_rows, require_qwen2_tokenizer

pytest.importorskip("psutil")


def _load_script():
    spec = importlib.util.spec_from_file_location("dpo_step", PROJECT_ROOT / "benchmarks" / "dpo_step.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["dpo_step"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_help_is_fast_and_lists_options(capsys):
    script = _load_script()
    with pytest.raises(SystemExit):
        script.parse_args(["--help"])
    assert "--quick" in capsys.readouterr().out


@require_orca_rows
@require_qwen2_tokenizer
def test_tiny_run_writes_the_schema(tmp_path):
    script = _load_script()
    out = tmp_path / "result.json"
    payload = script.main(
        [
            "--model",
            "tiny",
            "--steps",
            "2",
            "--batch",
            "1",
            "--max-length",
            "96",
            "--out",
            str(out),
            "--work-dir",
            str(tmp_path / "work"),
        ]
    )
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(payload))
    assert set(written) >= {"machine", "matmul_bf16_gflops", "results"}
    assert written["matmul_bf16_gflops"] > 0
    by_name = {row["strategy"]: row for row in written["results"]}
    assert list(by_name) == list(script.STRATEGIES)
    for name in script.STRATEGIES:
        if name == "ipex-llm":  # its own environment
            continue
        row = by_name[name]
        assert set(script.RESULT_KEYS) <= set(row)
        for key in ("pairs_per_s", "tokens_per_s", "mfu"):
            assert row[key] > 0 and math.isfinite(row[key]), (name, key)
        assert row["peak_memory_mib"] is not None
        if name.startswith("trl-"):  # TRL's own CPU kernels: its reference rounds differently on some CPUs
            assert abs(row["first_loss"] - math.log(2)) < 0.05, name
            continue
        assert row["first_loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 0
        assert row["last_loss"] == pytest.approx(by_name["original"]["last_loss"], abs=1e-4)
    assert by_name["precomputed-cold"]["reference_cache_hit"] is False
    assert by_name["precomputed-warm"]["reference_cache_hit"] is True
    assert by_name["prefix-sharing-cold"]["reference_cache_hit"] is False
    assert by_name["prefix-sharing-warm"]["reference_cache_hit"] is True
    # the prompt runs once per pair: fewer tokens than TRL's two sequences, never more
    assert 0.3 < by_name["prefix-sharing-warm"]["prefix_token_ratio"] < 1.0
    assert by_name["precomputed-warm"]["prefix_token_ratio"] == 1.0
    assert "adapter-off         against trl-precompute: " in script.format_table(written)
    ipex = by_name["ipex-llm"]
    assert ipex.get("skipped") or ipex["pairs_per_s"] > 0
    assert {e["strategy"] for e in written["memory_estimates"]} == {"original", "adapter-off", "precomputed"}


def test_nproc_adds_scaling_efficiency_from_two_processes(tmp_path):
    """--nproc 2 runs the strategies again under torchrun (two gloo processes on this CPU) and reports the scaling
    efficiency; on a CPU the two processes share the cores, so only its presence and the losses are checked."""
    script = _load_script()
    out = tmp_path / "result.json"
    argv = ["--model", "tiny", "--steps", "2", "--batch", "1", "--max-length", "96", "--out", str(out)]
    argv += ["--strategies", "adapter-off,precomputed-cold", "--work-dir", str(tmp_path / "work"), "--nproc", "2"]
    payload = script.main(argv)
    for row in payload["results"]:
        assert row["nproc"] == 2
        assert row["scaling_efficiency"] > 0 and math.isfinite(row["scaling_efficiency"])
        assert row["nproc_pairs_per_s"] > 0
        assert len(row["nproc_losses"]) == 2
        assert row["nproc_losses"][0] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 0
    assert "scaling efficiency" in script.format_table(payload)
