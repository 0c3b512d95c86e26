"""``benchmarks/dpo_step.py`` end to end on a tiny Qwen2 model (seconds), and its JSON schema."""

from __future__ import annotations

import importlib.util
import json
import math
import sys

import pytest
from conftest import PROJECT_ROOT, require_orca_rows, require_qwen2_tokenizer

pytest.importorskip("psutil")

from dpo_xpu.train.host_memory import allocated_mib  # noqa: E402


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
            "--rows",
            "first",  # few orca pairs fit whole in 96 tokens
            "--in-process",  # one process, one round: the schema, not the rounds (the next test)
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
            assert row["trl_cpu_repack"] is False
            # trained as trl-peft trains: on AVX512-BF16 CPUs bitsandbytes' repacked inference kernel, left on after
            # TRL's precompute, would drop the gradient through every NF4 layer (and fail on Qwen2's biases)
            assert row["losses"] == pytest.approx(by_name["trl-peft"]["losses"], abs=1e-4), name
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
    # the default recipe resolves to the fastest exact configuration: precomputed (cold) with prefix sharing
    assert by_name["defaults"]["reference_cache_hit"] is False and by_name["defaults"]["prefix_sharing"] is True
    assert by_name["defaults"]["prefix_token_ratio"] < 1.0
    assert "adapter-off         against trl-precompute: " in script.format_table(written)
    assert "of trl-peft's" in script.format_table(written)
    ipex = by_name["ipex-llm"]
    assert ipex.get("skipped") or ipex["pairs_per_s"] > 0
    measured = [name for name in script.STRATEGIES if not by_name[name].get("skipped")]
    assert [e["strategy"] for e in written["memory_estimates"]] == measured
    assert all(by_name[name]["planner_mib"] > 0 for name in measured)
    if allocated_mib() is not None:  # glibc: the allocator's own peak, beside the resident one
        assert all(0 < by_name[name]["peak_allocated_mib"] for name in measured)
    assert "planner " in script.format_table(written)


def test_nproc_adds_scaling_efficiency_from_two_processes(tmp_path):
    """--nproc 2 runs the strategies again under torchrun (two gloo processes on this CPU) and reports the scaling
    efficiency; on a CPU the two processes share the cores, so only its presence and the losses are checked."""
    script = _load_script()
    out = tmp_path / "result.json"
    argv = ["--model", "tiny", "--steps", "2", "--batch", "1", "--max-length", "96", "--out", str(out)]
    argv += ["--rows", "first", "--in-process", "--strategies", "adapter-off,precomputed-cold"]
    argv += ["--work-dir", str(tmp_path / "work"), "--nproc", "2"]
    payload = script.main(argv)
    for row in payload["results"]:
        assert row["nproc"] == 2
        assert row["scaling_efficiency"] > 0 and math.isfinite(row["scaling_efficiency"])
        assert row["nproc_pairs_per_s"] > 0
        assert len(row["nproc_losses"]) == 2
        assert row["nproc_losses"][0] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 0
    assert "scaling efficiency" in script.format_table(payload)


@require_orca_rows
@require_qwen2_tokenizer
def test_each_strategy_runs_in_its_own_process_and_the_fastest_round_is_reported(tmp_path):
    script = _load_script()
    out = tmp_path / "result.json"
    argv = ["--model", "tiny", "--steps", "2", "--batch", "1", "--max-length", "96", "--rows", "first"]
    argv += ["--strategies", "defaults,trl-peft", "--rounds", "2", "--out", str(out), "--work-dir", str(tmp_path)]
    payload = script.main(argv)
    assert payload["rounds"] == 2 and payload["one_process_per_strategy"] is True
    rows = {row["strategy"]: row for row in payload["results"]}
    assert list(rows) == ["defaults", "trl-peft"]
    pids = set()
    for row in rows.values():
        assert len(row["rounds_pairs_per_s"]) == 2
        assert row["pairs_per_s"] == max(row["rounds_pairs_per_s"])  # the fastest round
        assert row["rounds_spread"] >= 1.0
        assert row["first_loss"] == pytest.approx(math.log(2), abs=1e-4)
        pids.add(row["pid"])
    runs = [json.loads(p.read_text())["results"][0] for p in sorted((tmp_path / "rounds").glob("round*.json"))]
    assert len(runs) == 4 and len({r["pid"] for r in runs}) == 4  # four runs, four processes
    assert all(r["reference_cache_hit"] is False for r in runs if r["strategy"] == "defaults")  # cold every round
    assert rows["defaults"]["losses"] == pytest.approx(rows["trl-peft"]["losses"], abs=1e-4)
    assert "rounds: " in script.format_table(payload)


@require_orca_rows
@require_qwen2_tokenizer
def test_scaling_runs_a_cell_writes_table_and_figure_and_resumes(tmp_path):
    """benchmarks/scaling.py on one cell of the tiny model: the JSON (machine, versions, commit), the rows near
    max_length (--rows longest), the planner beside the peak, the markdown table and the PNG; a second call with
    the same settings keeps the cell instead of running it again."""
    spec = importlib.util.spec_from_file_location("scaling", PROJECT_ROOT / "benchmarks" / "scaling.py")
    scaling = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scaling)
    out, figure = tmp_path / "scaling.json", tmp_path / "scaling.png"
    argv = ["--model", "tiny", "--max-lengths", "256", "--batches", "2", "--dtypes", "float32", "--steps", "2"]
    argv += ["--rounds", "1", "--strategies", "defaults", "--out", str(out), "--figure", str(figure)]
    payload = scaling.main([*argv, "--work-dir", str(tmp_path / "work")])
    assert json.loads(out.read_text()) == payload
    assert {"torch", "transformers", "trl", "peft"} <= set(payload["machine"]["versions"])
    assert "commit" in payload["machine"]
    (cell,) = payload["cells"]
    assert (cell["dtype"], cell["batch"], cell["max_length"]) == ("float32", 2, 256)
    (row,) = cell["rows"]
    assert row["strategy"] == "defaults" and not row.get("error")
    assert len(row["sequence_tokens"]) == 4  # steps x batch pairs, the longest that fit whole
    assert all(0.75 * 256 < n <= 256 for n in row["sequence_tokens"])
    assert row["step_pairs_per_s"] == pytest.approx(2 / row["step_seconds"][1])  # the step after the first
    assert row["peak_memory_mib"] > 0 and row["planner_mib"] > 0
    train_peak = row["phase_peaks_mib"]["train"]  # on the CPU the planner estimates the training phase's peak
    assert 0 < train_peak <= row["peak_memory_mib"]
    assert row["planner_error"] == pytest.approx(row["planner_mib"] / train_peak - 1)
    table = out.with_suffix(".md").read_text()
    assert "| float32 | 2 | 256 |" in table and "commit " in table
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 0 < row["position_share"] < 1  # prefix sharing runs each prompt once: the planner is told so
    again = scaling.main([*argv, "--work-dir", str(tmp_path / "none")])  # resumed: nothing left to run
    assert again["cells"] == payload["cells"] and not (tmp_path / "none").exists()
    rerun = scaling.main([*argv, "--rerun", "defaults", "--work-dir", str(tmp_path / "rerun")])  # its row replaced
    (cell_again,) = rerun["cells"]
    assert [r["strategy"] for r in cell_again["rows"]] == ["defaults"] and (tmp_path / "rerun").is_dir()
    assert cell_again["rows"][0]["seconds"] != row["seconds"]
    stale = json.loads(out.read_text())  # a planner column from an older planner: --replan puts today's back
    stale["cells"][0]["rows"][0].update(planner_mib=1.0, planner_error=-0.99)
    out.write_text(json.dumps(stale))
    replanned = scaling.main([*argv, "--report", "--replan"])["cells"][0]["rows"][0]
    assert replanned["planner_mib"] == cell_again["rows"][0]["planner_mib"]
    assert replanned["planner_error"] == pytest.approx(cell_again["rows"][0]["planner_error"])
