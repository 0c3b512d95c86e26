"""Checkpoints and resume: complete markers, partial checkpoints skipped, an interrupted run resumed to the same
end as an uninterrupted one, and SIGTERM saving a checkpoint. Runs use the offline demo model (no ../shared)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import cpu_recipe
from transformers import TrainerCallback

from dpo_xpu.callbacks.checkpoints import (
    MARKER_FILE,
    check_resume_recipe,
    checkpoint_problem,
    find_resume_checkpoint,
    trim_step_log,
    write_marker,
)
from dpo_xpu.data.preferences import DEMO_SAMPLE_PATH
from dpo_xpu.demo import build_demo_model
from dpo_xpu.errors import RecipeError, RunFolderError
from dpo_xpu.files import current_umask
from dpo_xpu.outputs.plotting import read_metrics
from dpo_xpu.pipeline import run_training
from dpo_xpu.recipes import Recipe

ROOT = Path(__file__).resolve().parents[1]


def fake_checkpoint(run: Path, step: int, complete: bool = True) -> Path:
    path = run / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (path / "adapter_model.safetensors").write_bytes(os.urandom(64))
    if complete:
        write_marker(path, step)
    return path


def test_marker_detects_missing_and_changed_files(tmp_path):
    ckpt = fake_checkpoint(tmp_path, 3, complete=False)
    assert "no COMPLETE marker" in checkpoint_problem(ckpt)
    write_marker(ckpt, 3)
    assert checkpoint_problem(ckpt) is None
    (ckpt / "adapter_model.safetensors").write_bytes(os.urandom(64))  # same size, other bytes
    assert "differs from its checksum" in checkpoint_problem(ckpt)
    (ckpt / "adapter_model.safetensors").unlink()
    assert "is missing" in checkpoint_problem(ckpt)
    (ckpt / MARKER_FILE).write_text("{not json")
    assert "unreadable" in checkpoint_problem(ckpt)


def test_newest_complete_checkpoint_is_chosen(tmp_path):
    fake_checkpoint(tmp_path, 2)
    fake_checkpoint(tmp_path, 10)
    fake_checkpoint(tmp_path, 12, complete=False)  # interrupted while saving
    assert find_resume_checkpoint(tmp_path).name == "checkpoint-10"
    (tmp_path / "checkpoint-10" / "notes.txt").write_bytes(b"0")  # extra file: not in the marker, ignored
    assert find_resume_checkpoint(tmp_path).name == "checkpoint-10"
    (tmp_path / "checkpoint-10" / "trainer_state.json").write_text("{}")  # corrupted
    assert find_resume_checkpoint(tmp_path).name == "checkpoint-2"


def test_no_complete_checkpoint_is_a_clear_error(tmp_path):
    fake_checkpoint(tmp_path, 4, complete=False)
    with pytest.raises(RunFolderError, match=r"no complete checkpoint.*checkpoint-4: no COMPLETE marker.*--overwrite"):
        find_resume_checkpoint(tmp_path)


def test_resume_refuses_a_recipe_that_changes_the_result(tmp_path):
    saved = Recipe(output_dir=str(tmp_path), learning_rate=5e-5, max_steps=200)
    saved.save(tmp_path / "recipe.yaml")
    check_resume_recipe(Recipe(output_dir=str(tmp_path / "moved"), save_steps=7, eval_steps=3), tmp_path)
    changed = Recipe(output_dir=str(tmp_path), learning_rate=1e-4, max_steps=300)
    with pytest.raises(RecipeError, match=r"learning_rate: run has 5e-05, recipe has 0.0001; max_steps: run has 200"):
        check_resume_recipe(changed, tmp_path)
    with pytest.raises(RunFolderError, match="no run to resume"):
        check_resume_recipe(saved, tmp_path / "empty")


def test_step_log_is_trimmed_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 0, "eval/loss": 0.7}, {"step": 1}, {"step": 2}, {"step": 2, "eval/loss": 0.6}, {"step": 3}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo')
    assert trim_step_log(path, 2) == []  # no checkpoint: nothing rebuilt
    assert [r["step"] for r in read_metrics(path)] == [0, 1, 2, 2]


# --- end to end on the demo model --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
    return build_demo_model(tmp_path_factory.mktemp("demo") / "model")


def demo_recipe(model: Path, output_dir: Path, **overrides) -> Recipe:
    values = dict(max_steps=6, max_length=512, max_prompt_length=256, save_steps=2, limit=16)
    recipe = cpu_recipe(model, DEMO_SAMPLE_PATH, output_dir, **{**values, **overrides})
    recipe.trl_options = {**recipe.trl_options, "save_total_limit": None}  # every checkpoint kept: resumes use older
    return recipe


class StopAfter(TrainerCallback):
    """Simulates a crash: training stops after step ``step`` without saving."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(row["step"], row["loss"]) for row in read_metrics(run_dir) if "loss" in row]


@pytest.fixture(scope="module")
def runs(demo_model, tmp_path_factory):
    base = tmp_path_factory.mktemp("resume")
    run_training(demo_recipe(demo_model, base / "A"), live_plot=False)
    run_training(demo_recipe(demo_model, base / "B"), live_plot=False, callbacks=[StopAfter(5)])
    shutil.copytree(base / "B", base / "B2")
    shutil.copytree(base / "B", base / "B3")
    return demo_model, base


def test_uninterrupted_run_checkpoints_every_save_steps_and_at_the_end(runs):
    _, base = runs
    assert sorted(p.name for p in (base / "A").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    for step in (2, 4, 6):
        ckpt = base / "A" / f"checkpoint-{step}"
        assert checkpoint_problem(ckpt) is None
        for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
            assert (ckpt / name).is_file(), name
            assert (ckpt / name).stat().st_mode & 0o777 == 0o666 & ~current_umask(), name  # the user's umask
        assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == step


def test_interrupted_run_resumed_ends_where_the_uninterrupted_one_ends(runs):
    model, base = runs
    assert [s for s, _ in train_losses(base / "B")] == [1, 2, 3, 4, 5]
    result = run_training(demo_recipe(model, base / "B"), live_plot=False, resume=True)
    expected, got = train_losses(base / "A"), train_losses(base / "B")
    assert [s for s, _ in got] == [1, 2, 3, 4, 5, 6]  # step 5 was trimmed and computed again, not duplicated
    for (_, a), (_, b) in zip(expected, got):
        assert b == pytest.approx(a, abs=1e-4)
    assert result.trainer.state.global_step == 6
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()


def test_notebook_style_resume_ends_where_the_uninterrupted_run_ends(runs):
    """Notebook 03's cells with resume = True: open_run, the trainer built step by step, prepare_resume_of."""
    from dpo_xpu.models.loading import load_tokenizer
    from dpo_xpu.outputs.run_folder import unlock_run_dir
    from dpo_xpu.pipeline import load_run_data, load_run_models, make_dpo_trainer, open_run, prepare_resume_of

    model, base = runs
    recipe = demo_recipe(model, base / "B3")
    run_dir, checkpoint = open_run(recipe, resume=True)
    assert checkpoint is not None and checkpoint.parent == run_dir
    try:
        tokenizer = load_tokenizer(recipe.model_name_or_path)
        train_pairs, _ = load_run_data(recipe, tokenizer)
        policy, reference = load_run_models(recipe)
        trainer = make_dpo_trainer(recipe, policy, reference, tokenizer, train_pairs, live_plot=False)
        prepare_resume_of(trainer, checkpoint)
        trainer.train(resume_from_checkpoint=str(checkpoint))
    finally:
        unlock_run_dir(run_dir)
    expected, got = train_losses(base / "A"), train_losses(base / "B3")
    assert [s for s, _ in got] == [1, 2, 3, 4, 5, 6]
    assert got[-1][1] == pytest.approx(expected[-1][1], abs=1e-4)
    with pytest.raises(RunFolderError, match=r"is complete: nothing to train. Evaluate it \(notebook 04"):
        open_run(demo_recipe(model, base / "A"), resume=True)
    unlock_run_dir(base / "A")


def test_a_corrupted_last_checkpoint_is_skipped(runs):
    model, base = runs
    (base / "B2" / "checkpoint-4" / "adapter_model.safetensors").write_bytes(b"truncated")
    run_training(demo_recipe(model, base / "B2"), live_plot=False, resume=True)  # from checkpoint-2
    expected, got = train_losses(base / "A"), train_losses(base / "B2")
    assert [s for s, _ in got] == [1, 2, 3, 4, 5, 6]
    assert got[-1][1] == pytest.approx(expected[-1][1], abs=1e-4)
    assert checkpoint_problem(base / "B2" / "checkpoint-4") is None  # saved again, complete


def test_resume_needs_a_run_and_excludes_overwrite(runs, tmp_path):
    model, base = runs
    with pytest.raises(RunFolderError, match="no run to resume"):
        run_training(demo_recipe(model, tmp_path / "none"), live_plot=False, resume=True)
    with pytest.raises(RunFolderError, match="exclude each other"):
        run_training(demo_recipe(model, base / "A"), live_plot=False, resume=True, overwrite=True)
    with pytest.raises(RecipeError, match="beta: run has 0.1, recipe has 0.2"):
        run_training(demo_recipe(model, base / "A", beta=0.2), live_plot=False, resume=True)


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(demo_model, tmp_path):
    run = tmp_path / "run"
    recipe_file = tmp_path / "recipe.yaml"
    recipe = demo_recipe(demo_model, run, max_steps=200, save_steps=1000, warmup_steps=1)
    recipe_file.write_text(yaml.safe_dump(recipe.to_dict()))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dpo_xpu.cli", "train", "--recipe", str(recipe_file)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while not (run / "metrics.jsonl").is_file() or not (run / "metrics.jsonl").read_text().strip():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "no training step within 300 s"
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "stopped by SIGTERM" in stderr and "--resume" in stderr
    checkpoint = find_resume_checkpoint(run)
    assert 1 <= int(checkpoint.name.split("-")[1]) < 200
    assert checkpoint_problem(checkpoint) is None
