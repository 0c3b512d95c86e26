"""The dpo-xpu command line: one-line errors, no tracebacks, refusals, and a short real run."""

from __future__ import annotations

import json
import subprocess

import pytest
from helpers import run_cli as cli
from helpers import set_args


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("dpo-xpu: error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_help_is_fast_and_lists_commands():
    result = cli("--help")
    assert result.returncode == 0
    for command in ("env", "train", "plot", "demo-model"):
        assert command in result.stdout


def test_train_help_groups_the_keys_and_cuts_no_sentence():
    from dpo_xpu.recipes import KEY_TOPICS, key_docs, recipe_keys

    listed = [key for _, keys in KEY_TOPICS for key in keys]
    assert sorted(listed) == sorted(set(recipe_keys()) - {"trl_options"}) and len(listed) == len(set(listed))
    text = cli("train", "--help").stdout
    for topic, _ in KEY_TOPICS:
        assert f"  {topic}:" in text
    assert "  DPO (TRL's own):" in text and "  optimizer and schedule:" in text
    assert "Hu et al. 2021" in text  # an abbreviation ends no sentence
    assert not any(line.rstrip().endswith("...") for line in text.splitlines())
    flat = " ".join(text.split())
    for key, doc in key_docs().items():  # every key's whole meaning, wrapped, never cut
        if key != "trl_options":
            words = " ".join(doc["help"].replace("`", "").replace("\\|", "|").split())
            assert words.split("(")[0].strip() in flat, key


def test_env_json_reports_versions_and_exit_code():
    result = cli("env", "--json")
    report = json.loads(result.stdout)
    assert result.returncode == (1 if report["has_errors"] else 0)
    assert any(v["topic"] == "accelerator" for v in report["verdicts"])


def test_env_checks_set_values_without_a_recipe_file():
    assert "learning_rte (did you mean learning_rate?)" in one_line_error(cli("env", "--set", "learning_rte=1"))


def test_unknown_recipe_key(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lerning_rate: 1e-4\n")
    assert "lerning_rate" in one_line_error(cli("train", "--recipe", str(recipe)))


def test_missing_model_folder(tmp_path):
    args = set_args(output_dir=f"{tmp_path}/r", model_name_or_path="./no/such/model")
    line = one_line_error(cli("train", "--recipe", "recipes/cpu_tiny.yaml", *args))
    assert "no/such/model" in line and "does not exist" in line


def test_unknown_device():
    line = one_line_error(cli("train", "--recipe", "recipes/cpu_tiny.yaml", *set_args(device="tpu")))
    assert "device" in line


def test_absent_xpu_says_how_to_fix(tmp_path):
    args = set_args(output_dir=f"{tmp_path}/r", device="xpu", model_name_or_path="teknium/x")
    line = one_line_error(cli("train", "--recipe", "recipes/cpu_tiny.yaml", *args))
    assert "xpu" in line.lower() and "device='cpu'" in line


def test_bad_data_is_one_line_naming_row_and_column(tmp_path, stories260k_path):
    data = tmp_path / "bad.jsonl"
    good = {"system": "", "question": "q", "chosen": "a", "rejected": "b"}
    data.write_text(json.dumps(good) + "\n" + json.dumps({**good, "chosen": None}) + "\n")
    args = set_args(
        output_dir=f"{tmp_path}/r", dataset_name_or_path=data, model_name_or_path=stories260k_path, device="cpu"
    )
    line = one_line_error(cli("train", "--recipe", "recipes/cpu_tiny.yaml", *args))
    assert "line 2" in line and "chosen" in line


def test_plot_needs_a_run_folder(tmp_path):
    assert "metrics.jsonl" in one_line_error(cli("plot", str(tmp_path)))


def test_plot_without_metric_rows_keeps_the_curves_it_has(tmp_path):
    (tmp_path / "reward_curves.png").write_bytes(b"the curves of the run")
    for text in ("", "[1, 2]\n", '{"step": 1, "lo'):
        (tmp_path / "metrics.jsonl").write_text(text)
        assert "holds no metric rows" in one_line_error(cli("plot", str(tmp_path)))
    assert (tmp_path / "reward_curves.png").read_bytes() == b"the curves of the run"


def test_a_write_the_system_refuses_is_one_line_naming_the_path(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.69}\n')
    (tmp_path / "reward_curves.png").mkdir()  # refused as root too, unlike a read-only folder
    line = one_line_error(cli("plot", str(tmp_path)))
    assert str(tmp_path / "reward_curves.png") in line and "Fix: check that path's permissions" in line


@pytest.mark.slow
def test_train_writes_a_run_and_refuses_to_overwrite_it(tmp_path, stories260k_path, orca_rows_path):
    run = tmp_path / "cli-run"
    args = [
        "train",
        "--recipe",
        "recipes/cpu_tiny.yaml",
        *set_args(
            output_dir=run,
            model_name_or_path=stories260k_path,
            dataset_name_or_path=orca_rows_path,
            max_steps=3,
            limit=12,
            max_length=1024,
            max_prompt_length=512,
            device="cpu",
        ),
    ]
    first = cli(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    assert f"run folder: {run}" in first.stdout
    # at the default verbosity: what the reference and prefix sharing settings chose, and the time the run takes
    said = [line for line in first.stderr.splitlines() if line.startswith("INFO dpo_xpu")]
    assert any("reference:" in line for line in said) and any("prefix sharing:" in line for line in said), said
    assert any("will take about" in line for line in said), said
    assert any(line.startswith("INFO dpo_xpu.pipeline: memory on the CPU") for line in said), said
    assert "Tokenizing train dataset" not in first.stderr  # datasets' bars only with -v
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    again = cli(*args)
    assert "already holds a run" in one_line_error(again)
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3  # untouched
    replot = cli("plot", str(run))
    assert replot.returncode == 0 and (run / "reward_curves.png").is_file()
