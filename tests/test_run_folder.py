"""The run folder belongs to one process and holds one run: the lock, overwrite moving aside, failed starts that
leave nothing behind, resume of a finished run, inputs changed in content, full and read-only disks."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import cpu_recipe, make_trainer, run_cli, set_args

from dpo_xpu.errors import ModelLoadError, PreferenceDataError, RecipeError, RunFolderError
from dpo_xpu.outputs.run_folder import LOCK_FILE, prepare_run_dir, unlock_run_dir
from dpo_xpu.pipeline import run_training
from dpo_xpu.recipes import Recipe

HOLD_LOCK = """
import sys, time
from dpo_xpu.outputs.run_folder import lock_run_dir
lock_run_dir(sys.argv[1])
print("locked", flush=True)
time.sleep(120)
"""


def hold_lock(run_dir: Path) -> subprocess.Popen:
    """A second process holding the run folder's lock (as a running ``dpo-xpu train`` does)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_folder_locked_by_another_process_is_refused_and_taken_over_once_it_dies(tmp_path, caplog):
    run = tmp_path / "run"
    run.mkdir()
    proc = hold_lock(run)
    try:
        with pytest.raises(RunFolderError, match=rf"in use by process {proc.pid} .*wait until it ends"):
            prepare_run_dir(run)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    started = prepare_run_dir(run)  # the kernel dropped the dead process's lock
    assert started.run_dir == run
    assert f"left by process {proc.pid}" in caplog.text
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
    unlock_run_dir(run)


def test_the_cli_refuses_a_folder_another_process_trains_in(tmp_path, stories260k_path, orca_rows_path):
    run = tmp_path / "run"
    run.mkdir()
    proc = hold_lock(run)
    args = set_args(output_dir=run, model_name_or_path=stories260k_path, dataset_name_or_path=orca_rows_path)
    try:
        result = run_cli("train", "--recipe", "recipes/cpu_tiny.yaml", *args, "--overwrite")
    finally:
        proc.kill()
        proc.wait()
    assert result.returncode == 2
    said = [line for line in result.stderr.strip().splitlines() if not line.startswith("INFO ")]  # decisions
    assert said == [line for line in result.stderr.strip().splitlines() if line.startswith("dpo-xpu: error:")]
    assert f"in use by process {proc.pid}" in result.stderr


def test_overwrite_moves_the_earlier_run_aside_and_keeps_the_users_files(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoint-2").mkdir(parents=True)
    (run / LOCK_FILE).write_text("")  # every start writes it: the folder is a dpo_xpu run
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (run / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError, match="--overwrite"):
        prepare_run_dir(run)
    assert (run / "metrics.jsonl").exists()
    started = prepare_run_dir(run, overwrite=True)
    assert started.moved_to == tmp_path / "run.previous"
    assert (started.moved_to / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert (started.moved_to / "checkpoint-2").is_dir()
    assert not (run / "metrics.jsonl").exists() and (run / "notes.txt").read_text() == "mine"
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    assert prepare_run_dir(run, overwrite=True).moved_to == tmp_path / "run.previous-2"
    unlock_run_dir(run)


def test_files_of_a_start_that_never_trained_do_not_block_the_retry(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_FILE).write_text("")  # the start locked the folder first
    (run / "recipe.yaml").write_text("")  # a 0-byte recipe.yaml, as a full disk leaves it
    (run / "environment.json").write_text("{}")
    (run / "metrics.jsonl").write_text("")
    prepare_run_dir(run)
    unlock_run_dir(run)


def test_output_dir_that_is_a_file_is_one_clear_error(tmp_path):
    path = tmp_path / "run"
    path.write_text("not a folder")
    with pytest.raises(RunFolderError, match="is a file, not a folder"):
        prepare_run_dir(path)


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("warmup_steps", -5, ">= 0"),
        ("lora_dropout", 1.5, "in [0, 1)"),
        ("max_steps", 0, "> 0, or -1"),
        ("max_steps", -3, "> 0, or -1"),
        ("save_steps", 0, "> 0"),
        ("lr_scheduler_type", "bogus", "SchedulerType"),
    ],
)
def test_numeric_options_are_range_checked_before_anything_runs(key, value, words):
    with pytest.raises(RecipeError, match=rf"^{key}: .*{re.escape(words)}"):
        Recipe(**{key: value})


def test_epochs_must_be_positive_when_max_steps_is_minus_one():
    with pytest.raises(RecipeError, match="num_train_epochs"):
        Recipe(max_steps=-1, num_train_epochs=0)


def test_max_prompt_length_follows_max_length_unless_set():
    assert Recipe().max_prompt_length == 1024  # the original recipe: 1024 of 1536
    assert Recipe(max_length=512).max_prompt_length == 341
    assert Recipe(max_length=1024, max_prompt_length=900).max_prompt_length == 900
    with pytest.raises(RecipeError, match="must be smaller than max_length"):
        Recipe(max_length=512, max_prompt_length=600)
    from dpo_xpu.recipes import load_recipe

    original = Path(__file__).resolve().parents[1] / "recipes" / "original_openhermes_mistral7b.yaml"
    assert load_recipe(original).max_prompt_length == 1024
    assert load_recipe(original, overrides=["max_length=1024"]).max_prompt_length == 682  # lowering one key composes


def test_a_missing_relative_model_folder_is_an_error_at_once(tmp_path, monkeypatch):
    from dpo_xpu.models.base import resolve_model_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="model folder runs/demo-model does not exist.*make demo"):
        resolve_model_path("runs/demo-model")
    assert time.perf_counter() - start < 2


@pytest.mark.parametrize("kind", ["model", "dataset"])
def test_a_hub_id_offline_is_one_line_at_once(monkeypatch, kind):
    from dpo_xpu.data.sources import load_preference_pairs
    from dpo_xpu.models.base import resolve_model_path

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    load, error, key = {
        "model": (resolve_model_path, ModelLoadError, "model_name_or_path"),
        "dataset": (load_preference_pairs, PreferenceDataError, "dataset_name_or_path"),
    }[kind]
    start = time.perf_counter()
    with pytest.raises(
        error, match=rf"^{key}: 'some-org/not-cached' is a hub id, .*HF_HUB_OFFLINE=1.*not in the local"
    ):
        load("some-org/not-cached")
    assert time.perf_counter() - start < 5


# ---- whole runs on stories260K (seconds per step) ----


def quick_recipe(stories260k_path, data, out, **overrides) -> Recipe:
    values = dict(limit=4, max_steps=2, warmup_steps=0, max_length=320, max_prompt_length=192, save_steps=1)
    values.update(overrides)
    return cpu_recipe(stories260k_path, data, out, **values)


def test_a_failed_start_leaves_the_folder_as_it_was(stories260k_path, tmp_path):
    run = tmp_path / "run"
    recipe = quick_recipe(stories260k_path, tmp_path / "missing.jsonl", run)
    with pytest.raises(PreferenceDataError):
        run_training(recipe, live_plot=False)
    assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]


@pytest.mark.slow
def test_overwrite_whose_start_fails_puts_the_earlier_run_back(stories260k_path, orca_rows_path, tmp_path):
    run = tmp_path / "run"
    run_training(quick_recipe(stories260k_path, orca_rows_path, run, max_steps=1), live_plot=False)
    before = sorted(p.name for p in run.iterdir())
    bad = quick_recipe(stories260k_path, tmp_path / "empty.jsonl", run)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(PreferenceDataError):
        run_training(bad, overwrite=True, live_plot=False)
    assert sorted(p.name for p in run.iterdir()) == before
    assert not (tmp_path / "run.previous").exists()


@pytest.mark.slow
def test_resume_on_a_finished_run_trains_nothing_and_resaves_a_missing_adapter(
    stories260k_path, orca_rows_path, tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="dpo_xpu")  # the resume line is INFO
    run = tmp_path / "run"
    recipe = quick_recipe(stories260k_path, orca_rows_path, run)
    run_training(recipe, live_plot=False)
    rows = (run / "metrics.jsonl").read_text()
    adapter = (run / "adapter" / "adapter_model.safetensors").read_bytes()
    result = run_training(recipe, resume=True, live_plot=False)
    assert result.trainer is None and "is complete (step 2 of 2)" in caplog.text
    assert f"resuming {run} from checkpoint-2 (step 2)" in caplog.text
    assert (run / "metrics.jsonl").read_text() == rows  # no step 3
    shutil.rmtree(run / "adapter")  # as after a final save that failed on a full disk
    run_training(recipe, resume=True, live_plot=False)
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    assert (run / "adapter" / "tokenizer_config.json").is_file()


@pytest.mark.slow
def test_resume_refuses_data_changed_in_content(stories260k_path, orca_rows_path, tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(orca_rows_path.read_text().splitlines(keepends=True)[:6]))
    run = tmp_path / "run"
    recipe = quick_recipe(stories260k_path, data, run)
    run_training(recipe, live_plot=False)
    lines = data.read_text().splitlines(keepends=True)
    data.write_text("".join(reversed(lines)))  # same path, other content
    with pytest.raises(RunFolderError, match=rf"changed in content since the run started: {data}"):
        run_training(recipe, resume=True, live_plot=False)


@pytest.mark.slow
def test_a_second_trainer_on_the_same_folder_is_refused(stories260k_path, orca_rows_path, tmp_path):
    recipe = quick_recipe(stories260k_path, orca_rows_path, tmp_path / "run", max_steps=1)
    make_trainer(recipe).train()
    with pytest.raises(RunFolderError, match="already holds the steps of another training"):
        make_trainer(recipe).train()
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1


def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


@pytest.mark.slow
def test_a_full_disk_is_one_line_saying_what_was_kept(stories260k_path, orca_rows_path, tmp_path):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "size=1m"):
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        recipe = quick_recipe(stories260k_path, orca_rows_path, disk / "run", max_steps=30)
        with pytest.raises(RunFolderError, match=r"^no space left on device while writing .*Kept: .*--resume"):
            run_training(recipe, live_plot=False)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)  # lazy: a failed write may hold a file


def test_a_read_only_folder_is_one_clear_error(tmp_path):
    disk = tmp_path / "ro"
    if not _mount_tmpfs(disk, "ro,size=1m"):
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        with pytest.raises(RunFolderError, match=r"cannot write to output_dir .*Read-only file system"):
            prepare_run_dir(disk / "run")
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)  # lazy: a failed write may hold a file


@pytest.mark.slow
def test_the_cli_prints_one_concise_line_per_step(stories260k_path, orca_rows_path, tmp_path):
    args = set_args(
        model_name_or_path=stories260k_path,
        dataset_name_or_path=orca_rows_path,
        output_dir=tmp_path / "run",
        max_steps=2,
        limit=4,
        max_length=320,
        device="cpu",
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "dpo_xpu.cli", "train", "--recipe", "recipes/cpu_tiny.yaml", *args],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout + done.stderr
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["1/2", "2/2"], out[-2000:]
    assert "loss " in lines[0] and "accuracy " in lines[0] and "margin " in lines[0]
    assert "{'loss'" not in out and "'rewards/chosen'" not in out


@pytest.mark.slow
def test_the_model_card_names_the_base_model_data_recipe_and_metrics(stories260k_path, orca_rows_path, tmp_path):
    run = tmp_path / "run"
    result = run_training(quick_recipe(stories260k_path, orca_rows_path, run), live_plot=False)
    for card in (run / "README.md", result.adapter_dir / "README.md"):
        text = card.read_text()
        assert f"base_model: {stories260k_path}" in text and "None" not in text
        assert f"- {orca_rows_path}" in text and "| `learning_rate` | `0.0005` |" in text
        last = result.metrics[-1]
        assert f"| loss | {last['loss']:.4f} |" in text


@pytest.mark.slow
@pytest.mark.parametrize("notebook", [False, True])
def test_one_progress_callback_with_concise_lines_replaces_transformers_own(
    stories260k_path, orca_rows_path, tmp_path, notebook
):
    """In a notebook transformers' table grows a row per step above the live curves; it is replaced by a bar."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from dpo_xpu.callbacks.metrics import StepLineProgressCallback, use_step_lines

    trainer = make_trainer(quick_recipe(stories260k_path, orca_rows_path, tmp_path / "run", max_steps=1))
    use_step_lines(trainer, notebook=notebook)
    progress = [
        cb
        for cb in trainer.callback_handler.callbacks
        if isinstance(cb, (ProgressCallback, PrinterCallback)) or type(cb).__name__ == "NotebookProgressCallback"
    ]
    assert len(progress) == 1 and isinstance(progress[0], StepLineProgressCallback)
    assert progress[0].lines is (not notebook)
