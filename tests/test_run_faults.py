"""Faults of the run folder end in one line that names the file and the fix, and lose nothing the user made
(issue #22): metrics rows lost before a resume, a folder of the user's own files, run_notebooks' earlier runs, corrupt
JSON, a full disk at the start, a run that diverges to NaN, and a hostile pickle in a checkpoint.

Runs are 1-3 steps of stories260K (seconds each); the CLI runs in this process (``dpo_xpu.cli.main``).
"""

from __future__ import annotations

import errno
import importlib.util
import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import pytest
import yaml
from helpers import short_recipe

from dpo_xpu.callbacks.checkpoints import checkpoint_problem, trim_step_log, write_marker
from dpo_xpu.cli import main as cli_main
from dpo_xpu.errors import RunFolderError, TrainingDiverged
from dpo_xpu.outputs.plotting import read_metrics
from dpo_xpu.outputs.run_folder import LOCK_FILE, move_aside
from dpo_xpu.pipeline import run_training

ROOT = Path(__file__).resolve().parents[1]


def quick(model: Path, rows: Path, out: Path, **overrides) -> object:
    """Two steps of batch 2 on 4 rows, a checkpoint at each step."""
    return short_recipe(model, rows, out, **{"limit": 4, "max_steps": 2, "save_steps": 1, **overrides})


def cli_error(capsys, *args: str) -> str:
    """Run ``dpo-xpu`` in this process; return its one error line (exit 2, no traceback)."""
    code = cli_main(list(args))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("dpo-xpu: error:")]
    assert len(lines) == 1, err
    return lines[0]


def recipe_file(recipe, path: Path) -> Path:
    path.write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, stories260k_path, orca_rows_path) -> Path:
    """A finished 2-step run with checkpoint-1 and checkpoint-2."""
    run = tmp_path_factory.mktemp("faults") / "run"
    run_training(quick(stories260k_path, orca_rows_path, run), live_plot=False)
    return run


@pytest.fixture
def copy(trained, tmp_path, stories260k_path, orca_rows_path):
    """A copy of the trained run and its recipe."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    return run, quick(stories260k_path, orca_rows_path, run)


# 1. resume rebuilds the metrics rows it lost ------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["cut", "not a row"])
def test_resume_rebuilds_metrics_rows_lost_before_the_checkpoint(copy, damage, caplog):
    run, recipe = copy
    original = read_metrics(run)
    shutil.rmtree(run / "checkpoint-2")  # the run stopped after checkpoint-1 was saved
    first = (run / "metrics.jsonl").read_text().splitlines()[0]
    (run / "metrics.jsonl").write_text(first[: len(first) // 2] if damage == "cut" else "[1, 2]\n")
    result = run_training(recipe, resume=True, live_plot=False)
    rows = read_metrics(run)
    assert [row["step"] for row in rows] == [1, 2]
    assert rows[0] == original[0]  # every key and value, elapsed_s and the step-0 check's included
    assert list(rows[1]) == list(original[1])
    assert "lost the rows of step(s) 1: rebuilt them from" in caplog.text
    assert result.trainer.state.global_step == 2


def test_restored_rows_keep_the_files_rows_and_order(tmp_path):
    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    history = [
        {"eval_loss": 0.69, "eval_rewards/chosen": 0.0, "epoch": 0, "step": 0, "elapsed_s": 0.5},
        {"loss": 0.69, "rewards/chosen": 0.0, "epoch": 0.5, "step": 1, "step0/logratio_gap": 0.0, "elapsed_s": 1.0},
        {"loss": float("nan"), "grad_norm": 2.0, "epoch": 1.0, "step": 2, "elapsed_s": 2.0},
        {"train_runtime": 3.0, "epoch": 1.0, "step": 2},
    ]
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 2, "log_history": history}))
    path = tmp_path / "metrics.jsonl"
    kept = {"step": 1, "epoch": 0.5, "loss": 0.69, "rewards/chosen": 0.0, "step0/logratio_gap": 0.0, "elapsed_s": 9.0}
    path.write_text(json.dumps(kept) + "\n")
    assert trim_step_log(path, 2, checkpoint) == [0, 2]
    rows = read_metrics(path)
    assert rows == [
        {"step": 0, "epoch": 0, "eval/loss": 0.69, "eval/rewards/chosen": 0.0, "elapsed_s": 0.5},
        kept,  # the file's own row, not the rebuilt one
        {"step": 2, "epoch": 1.0, "loss": "nan", "grad_norm": 2.0, "elapsed_s": 2.0},
    ]
    assert trim_step_log(path, 2, checkpoint) == []


# 2. a folder holding the user's own files ---------------------------------------------------------------------------


def test_a_folder_of_the_users_files_is_refused_and_left_as_it_was(tmp_path, capsys, stories260k_path, orca_rows_path):
    run = tmp_path / "mine"
    run.mkdir()
    files = {"README.md": "# my notes\n", "recipe.yaml": "# my recipe\nlearning_rate: 1e-4\n", "notes.txt": "keep"}
    for name, text in files.items():
        (run / name).write_text(text)
    recipe = quick(stories260k_path, orca_rows_path, run)
    for options in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(RunFolderError, match="not a dpo_xpu run folder") as err:
            run_training(recipe, live_plot=False, **options)
        assert "README.md, notes.txt, recipe.yaml" in str(err.value) and "another output_dir" in str(err.value)
    line = cli_error(capsys, "train", "--recipe", str(recipe_file(recipe, tmp_path / "r.yaml")), "--overwrite")
    assert f"{run} is not a dpo_xpu run folder" in line
    assert {p.name: p.read_text() for p in run.iterdir()} == files  # no lock file either
    assert not (tmp_path / "mine.previous").exists()


def test_move_aside_never_replaces_an_earlier_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    for name in ("run.previous", "run.previous-2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text(name)
    assert move_aside(run) == tmp_path / "run.previous-3"
    assert [(tmp_path / n / "metrics.jsonl").read_text() for n in ("run.previous", "run.previous-2")] == [
        "run.previous",
        "run.previous-2",
    ]


# 3. scripts/run_notebooks.py keeps every earlier run and checks the parameters first --------------------------------


@pytest.fixture(scope="module")
def run_notebooks():
    spec = importlib.util.spec_from_file_location("run_notebooks_script", ROOT / "scripts" / "run_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _earlier_runs(tmp_path: Path) -> dict[str, str]:
    out = tmp_path / "out"
    for name in ("out", "out.previous"):
        (tmp_path / name).mkdir()
        (tmp_path / name / LOCK_FILE).write_text("")
        (tmp_path / name / "metrics.jsonl").write_text(f'{{"step": 1, "run": "{name}"}}\n')
    return {p.relative_to(tmp_path).as_posix(): p.read_text() for p in sorted(out.parent.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("param", ["max_steps=0", "learning_rate=fast", "recipe_file=../recipes/cpu_dem.yaml"])
def test_run_notebooks_checks_the_parameters_before_moving_anything(run_notebooks, tmp_path, param):
    before = _earlier_runs(tmp_path)
    with pytest.raises(SystemExit) as err:
        run_notebooks.main(["--only", "03", f"--param=output_dir={tmp_path / 'out'}", f"--param={param}"])
    message = str(err.value)
    assert message.startswith("run_notebooks: error: notebook 03_dpo_training.ipynb's parameters: ")
    assert param.split("=")[0] in message and "nothing was run or moved" in message and "\n" not in message
    after = {p.relative_to(tmp_path).as_posix(): p.read_text() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    assert after == before


def test_run_notebooks_keeps_every_earlier_run_and_never_moves_the_users_folder(run_notebooks, tmp_path):
    before = _earlier_runs(tmp_path)
    assert run_notebooks.move_earlier_run(tmp_path / "out") == tmp_path / "out.previous-2"
    assert (tmp_path / "out.previous" / "metrics.jsonl").read_text() == before["out.previous/metrics.jsonl"]
    assert (tmp_path / "out.previous-2" / "metrics.jsonl").read_text() == before["out/metrics.jsonl"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep")
    with pytest.raises(SystemExit, match=r"run_notebooks: error: .*mine is not a dpo_xpu run folder.*thesis.tex"):
        run_notebooks.move_earlier_run(mine)
    assert (mine / "thesis.tex").read_text() == "keep" and not (tmp_path / "mine.previous").exists()


# 4. corrupt JSON files of the run folder ----------------------------------------------------------------------------


def test_a_corrupt_fingerprints_file_is_one_line(copy, capsys, tmp_path):
    run, recipe = copy
    (run / "fingerprints.json").write_text('{"model_name_or_path": "sha256:ab')
    line = cli_error(capsys, "train", "--recipe", str(recipe_file(recipe, tmp_path / "r.yaml")), "--resume")
    assert f"{run / 'fingerprints.json'} is corrupt: not valid JSON (" in line
    assert "delete it to resume without checking" in line
    (run / "fingerprints.json").write_text("[1, 2]")
    with pytest.raises(RunFolderError, match="fingerprints.json is corrupt: not a mapping"):
        run_training(recipe, resume=True, live_plot=False)


def test_a_corrupt_trainer_state_is_skipped_and_named(copy, capsys, tmp_path):
    run, recipe = copy
    for step in (2, 1):
        (run / f"checkpoint-{step}" / "trainer_state.json").write_text('{"global_step": ')
        write_marker(run / f"checkpoint-{step}", step)  # as if it was written so: the checksums match
        assert checkpoint_problem(run / f"checkpoint-{step}") == "trainer_state.json is not a JSON object (corrupt)"
    line = cli_error(capsys, "train", "--recipe", str(recipe_file(recipe, tmp_path / "r.yaml")), "--resume")
    assert "holds no complete checkpoint to resume from (checkpoint-2: trainer_state.json is not a JSON object" in line


# 5. a full disk at the start ----------------------------------------------------------------------------------------


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_disk_full_at_the_start_is_one_line_and_undone(copy, capsys, monkeypatch):
    from dpo_xpu.recipes import Recipe

    run, recipe = copy
    before = sorted(p.name for p in run.iterdir())
    monkeypatch.setattr(Recipe, "save", _no_space)
    with pytest.raises(RunFolderError, match=r"^no space left on device while writing .* before the first step .*"):
        run_training(recipe, overwrite=True, live_plot=False)
    assert sorted(p.name for p in run.iterdir()) == before  # the earlier run moved back
    assert not (run.parent / "run.previous").exists()
    fresh = recipe_file(
        quick(recipe.model_name_or_path, recipe.dataset_name_or_path, run.parent / "new"), run.parent / "r.yaml"
    )
    line = cli_error(capsys, "train", "--recipe", str(fresh))
    assert "nothing was trained and the folder is as it was. Fix: free some space" in line


def test_a_disk_full_when_writing_the_lock_is_one_line(tmp_path, monkeypatch):
    from dpo_xpu.outputs.run_folder import prepare_run_dir

    write = os.write

    def full_for_the_lock(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(LOCK_FILE):
            _no_space()
        return write(fd, data)

    monkeypatch.setattr(os, "write", full_for_the_lock)
    with pytest.raises(RunFolderError, match=rf"^no space left on device while writing .*{LOCK_FILE} before"):
        prepare_run_dir(tmp_path / "run")


# 6. a run that diverges to NaN ---------------------------------------------------------------------------------------


def test_a_diverging_run_stops_at_the_first_nan_step_and_keeps_the_last_good_checkpoint(
    tmp_path, stories260k_path, orca_rows_path
):
    run = tmp_path / "run"
    recipe = quick(stories260k_path, orca_rows_path, run, learning_rate=1e6, max_steps=3)
    with pytest.raises(TrainingDiverged) as err:  # a DpoXpuError: the CLI prints it as one line, exit 2
        run_training(recipe, live_plot=False)
    line = str(err.value)
    step = int(line.split("training diverged at step ")[1].split(":")[0])
    assert "\n" not in line and ("not finite" in line or "nan" in line)
    assert "learning_rate 1e+06 is too high" in line and f"checkpoint-{step - 1}, is kept" in line
    assert checkpoint_problem(run / f"checkpoint-{step - 1}") is None
    assert not (run / f"checkpoint-{step}").exists() and not (run / "adapter").exists()
    assert read_metrics(run)[-1]["step"] == step  # the diverged step's values are in metrics.jsonl


def test_the_cli_summary_shows_nan_and_missing_values(monkeypatch, capsys, tmp_path):
    import dpo_xpu.pipeline as pipeline

    rows = [{"step": 4, "loss": "nan", "rewards/margins": "inf"}]
    result = pipeline.RunResult(tmp_path, rows, tmp_path / "adapter", tmp_path / "curves.png", None)
    monkeypatch.setattr(pipeline, "run_training", lambda *args, **kwargs: result)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output_dir: {tmp_path}\n")
    assert cli_main(["train", "--recipe", str(recipe)]) == 0
    assert "last step 4: loss nan, accuracy n/a, margin inf" in capsys.readouterr().out


# 7. a hostile pickle in a checkpoint ------------------------------------------------------------------------------


class _Hostile:
    def __init__(self, flag: Path) -> None:
        self.flag = flag

    def __reduce__(self):
        return os.system, (f"touch {self.flag}",)


@pytest.mark.parametrize("name", ["rng_state.pth", "optimizer.pt", "scheduler.pt"])
def test_a_hostile_pickle_in_a_checkpoint_is_refused_in_one_line(copy, capsys, tmp_path, name):
    run, recipe = copy
    shutil.rmtree(run / "checkpoint-2")  # the run stopped after step 1: resume loads checkpoint-1
    flag = tmp_path / "pwned"
    (run / "checkpoint-1" / name).write_bytes(pickle.dumps(_Hostile(flag), protocol=2))
    write_marker(run / "checkpoint-1", 1)  # the checksums match: only loading it would tell
    line = cli_error(capsys, "train", "--recipe", str(recipe_file(recipe, tmp_path / "r.yaml")), "--resume")
    assert f"checkpoint-1: torch refuses to load {name} as plain tensors (unsupported GLOBAL posix.system)" in line
    assert "delete checkpoint-1" in line
    assert not flag.exists()


def test_a_hostile_pickle_in_the_newest_checkpoint_resumes_from_an_older_one(copy, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="dpo_xpu")  # the resume line is INFO
    run, recipe = copy
    flag = tmp_path / "pwned"
    (run / "checkpoint-2" / "optimizer.pt").write_bytes(pickle.dumps(_Hostile(flag), protocol=2))
    write_marker(run / "checkpoint-2", 2)
    result = run_training(recipe, resume=True, live_plot=False)
    assert "Skipping checkpoint checkpoint-2, which cannot be resumed from: torch refuses to load optimizer.pt" in (
        caplog.text
    )
    assert f"resuming {run} from checkpoint-1 (step 1)" in caplog.text
    assert result.trainer.state.global_step == 2 and not flag.exists()
    assert checkpoint_problem(run / "checkpoint-2") is None  # saved again
