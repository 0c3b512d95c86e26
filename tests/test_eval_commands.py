"""`dpo-xpu evaluate` and `dpo-xpu export` (dpo_xpu.finished_run) on a 2-step stories260K run, trained once."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import run_cli, short_recipe

from dpo_xpu import evaluate_run, export_run, load_recipe, load_run_data, load_tokenizer
from dpo_xpu.errors import RunFolderError
from dpo_xpu.finished_run import EXPORT_MARKER, RunEvaluation, _replacing, samples_verdict
from dpo_xpu.pipeline import run_training

METRICS = {"reward_accuracy", "mean_margin", "mean_chosen_reward", "mean_rejected_reward", "drift_chosen_logratio"}
KEYS = METRICS | {"beta", "n_pairs", "split", "samples_differ", "n_samples"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, stories260k_path, orca_rows_path):
    """A finished run: 8 rows, 2 held out, 2 steps (about 10 s); tests work on copies of it."""
    out = tmp_path_factory.mktemp("eval-commands") / "run"
    recipe = short_recipe(
        stories260k_path, orca_rows_path, out, limit=8, eval_fraction=0.25, max_steps=2, max_new_tokens=16
    )
    run_training(recipe, live_plot=False)
    return out


@pytest.fixture
def run_dir(trained, tmp_path):
    return shutil.copytree(trained, tmp_path / "run")


def _one_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, (result.returncode, result.stderr)
    return lines[0]


def test_evaluate_writes_the_results_and_shows_policy_and_reference_side_by_side(run_dir):
    result = run_cli("evaluate", str(run_dir), "--num-eval-samples", "2", "--batch-size", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    assert KEYS <= set(evaluation) and evaluation["split"] == "eval" and evaluation["n_pairs"] == 2
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == evaluation["n_samples"] == 2
    assert evaluation["samples_differ"] == sum(not s["identical"] for s in samples)
    assert all(s["identical"] == (s["policy"] == s["reference"]) for s in samples)
    # the held-out rows of the run, as training split them: none was trained on
    recipe = load_recipe(run_dir / "recipe.yaml")
    train, heldout = load_run_data(recipe, load_tokenizer(run_dir / "adapter"))
    assert {s["prompt"] for s in samples} <= set(heldout["prompt"]) and not {s["prompt"] for s in samples} & set(
        train["prompt"]
    )
    out = result.stdout
    assert (
        f"on 2 held-out pairs (beta {recipe.beta})" in out
        and f"samples_differ: {evaluation['samples_differ']} of 2" in out
    )
    assert "[1] " in out and "[2] " in out and "prompt:" in out
    assert ("policy:" in out and "reference:" in out) or "both:" in out

    # the same figures from the function the notebook calls; the recipe's max_new_tokens when none is given
    again = evaluate_run(run_dir, num_eval_samples=1, batch_size=2, progress=False)
    assert {k: again.metrics[k] for k in METRICS} == pytest.approx({k: evaluation[k] for k in METRICS}, abs=1e-5)
    assert again.samples[0] == samples[0]


def test_a_folder_that_is_not_a_finished_run_is_one_line(tmp_path, run_dir):
    assert "recipe.yaml does not exist: train first" in _one_line(run_cli("evaluate", str(tmp_path)))
    assert "is not a folder" in _one_line(run_cli("export", str(tmp_path / "missing"), "--merged"))
    shutil.rmtree(run_dir / "adapter")  # started, not finished
    line = _one_line(run_cli("evaluate", str(run_dir)))
    assert "is not a finished run" in line and f"dpo-xpu train --recipe {run_dir / 'recipe.yaml'} --resume" in line
    for checkpoint in run_dir.glob("checkpoint-*"):
        shutil.rmtree(checkpoint)  # nothing to resume either
    line = _one_line(run_cli("evaluate", str(run_dir)))
    assert "no complete checkpoint to resume" in line and line.endswith(f"{run_dir / 'recipe.yaml'} --overwrite")


def test_a_run_without_held_out_rows_says_how_to_evaluate_it(run_dir):
    recipe = load_recipe(run_dir / "recipe.yaml")
    recipe.eval_fraction = 0.0
    recipe.save(run_dir / "recipe.yaml")
    line = _one_line(run_cli("evaluate", str(run_dir)))
    assert "held no rows out (eval_fraction: 0.0)" in line and "--split train" in line and "eval_fraction > 0" in line
    evaluation = evaluate_run(
        run_dir, split="train", max_eval_pairs=2, num_eval_samples=1, max_new_tokens=4, progress=False
    )
    assert evaluation.metrics["split"] == "train" and evaluation.metrics["n_pairs"] == 2
    assert "on 2 training pairs" in evaluation.summary()


def test_samples_verdict_and_comparison_say_when_nothing_changed(tmp_path):
    assert samples_verdict(2, 3) == "samples_differ: 2 of 3 policy answers differ from the reference's"
    unchanged = samples_verdict(0, 3)
    assert unchanged.startswith("samples_differ: 0 of 3") and "did not change yet" in unchanged
    assert "too few steps or too low a learning rate" in unchanged
    prompt = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName  a\ncolour.<|im_end|>\n"
    samples = [
        {"prompt": prompt + "<|im_start|>assistant\n", "policy": "Red.", "reference": "Red.", "identical": True},
        {"prompt": "plain text", "policy": "", "reference": "x " * 200, "identical": False},
    ]
    metrics = {"samples_differ": 1, "n_samples": 2}
    shown = RunEvaluation(tmp_path, metrics, samples, tmp_path / "e", tmp_path / "s").comparison().splitlines()
    assert shown[:3] == ["[1] identical", "  prompt:    Name a colour.", "  both:      Red."]
    assert shown[3:6] == ["[2] different", "  prompt:    plain text", '  policy:    ""']
    assert shown[6].startswith("  reference: x x") and shown[6].endswith("...") and len(shown) == 7


def test_export_merged_writes_the_model_and_its_check_and_refuses_to_overwrite(run_dir):
    (run_dir / "evaluation.json").write_text(json.dumps({"reward_accuracy": 0.5}))
    result = run_cli("export", str(run_dir), "--merged")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "merged" / "config.json").is_file() and (run_dir / "merged" / "tokenizer.json").is_file()
    check = json.loads((run_dir / "merge_check.json").read_text())
    assert check["matches"] is True and check["greedy_texts"] == 4  # the run's prompts, held-out ones first
    assert json.loads((run_dir / "evaluation.json").read_text()) == {"reward_accuracy": 0.5, "merge": check}
    assert f"merged model: {run_dir / 'merged'} ({check['weights_dtype']})" in result.stdout
    assert "merge check:  matches: " in result.stdout and str(run_dir / "merge_check.json") in result.stdout

    line = _one_line(run_cli("export", str(run_dir), "--merged"))
    assert f"{run_dir / 'merged'} already holds files (" in line and line.endswith(
        "): replace it with --overwrite (overwrite=True), or choose another --out"
    )
    assert (run_dir / "merge_check.json").is_file(), "a refused export leaves the earlier check"


def test_export_run_to_another_folder_replaces_it_only_when_asked(run_dir, tmp_path):
    copied = export_run(run_dir, out_dir=tmp_path / "adapter-copy")
    assert copied.merged_dir is None and (tmp_path / "adapter-copy" / "adapter_config.json").is_file()
    assert "dpo-xpu export" in copied.summary() and export_run(run_dir).adapter_dir == run_dir / "adapter"
    out = tmp_path / "elsewhere"
    out.mkdir()
    (out / "notes.txt").write_text("the user's")
    with pytest.raises(RunFolderError, match=r"already holds files \(notes.txt\)"):
        export_run(run_dir, merged=True, out_dir=out)
    with pytest.raises(RunFolderError, match="holds files no dpo-xpu export wrote .notes.txt.*nothing was changed"):
        export_run(run_dir, merged=True, out_dir=out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    (out / "notes.txt").unlink()
    exported = export_run(run_dir, merged=True, out_dir=out)
    (out / "stale.txt").write_text("left by an earlier export")
    exported = export_run(run_dir, merged=True, out_dir=out, overwrite=True)  # an export's folder is replaced
    assert exported.merged_dir == out and exported.matches and (out / "config.json").is_file()
    assert not (out / "stale.txt").exists() and not (run_dir / "merged").exists()
    assert exported.check_path == run_dir / "merge_check.json" and exported.check_path.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter-copy", "elsewhere", "run"], "no scratch left"


def test_replacing_puts_the_old_content_back_when_writing_fails(tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "model.safetensors").write_text("old")
    (out / EXPORT_MARKER).write_text("{}")  # an earlier export's folder: --overwrite may replace it
    with pytest.raises(OSError, match="disk full"), _replacing(out, overwrite=True):
        out.mkdir()
        (out / "model.safetensors").write_text("half-written")
        raise OSError("disk full")
    assert (out / "model.safetensors").read_text() == "old" and sorted(tmp_path.iterdir()) == [out]


def test_damaged_reports_in_the_run_folder_are_left_as_they_are_with_a_warning(run_dir, caplog):
    """A report cut off by a killed process (or edited by hand) neither stops evaluate and export nor is replaced."""
    cut_check, cut_evaluation = '{"matches": tr', b'{"reward_accuracy": 0.5, "mar\xff'
    (run_dir / "merge_check.json").write_text(cut_check)
    evaluated = evaluate_run(run_dir, num_eval_samples=0, batch_size=2, progress=False)
    assert "merge" not in evaluated.metrics and (run_dir / "merge_check.json").read_text() == cut_check
    assert "merge_check.json is damaged" in caplog.text
    (run_dir / "evaluation.json").write_bytes(cut_evaluation)
    exported = export_run(run_dir, merged=True)
    assert exported.matches and json.loads((run_dir / "merge_check.json").read_text())["matches"] is True
    assert (run_dir / "evaluation.json").read_bytes() == cut_evaluation, "a damaged report is not overwritten"
    assert "evaluation.json is damaged" in caplog.text
    assert not [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")], "atomic writes leave no scratch"


def test_export_never_replaces_the_run_itself_or_another_run(run_dir, tmp_path):
    """--out naming the run folder, its adapter or a checkpoint, or another run (being trained: its lock) is refused
    before anything is written, with --overwrite too."""
    other = shutil.copytree(run_dir, tmp_path / "other-run")
    before = sorted(p.name for p in other.iterdir())
    for out in (run_dir, run_dir / "adapter", run_dir.parent, *run_dir.glob("checkpoint-*")):
        for merged in (False, True):
            with pytest.raises(RunFolderError, match="would replace the run folder"):
                export_run(run_dir, merged=merged, out_dir=out, overwrite=True)
    with pytest.raises(RunFolderError, match="holds files no dpo-xpu export wrote"):
        export_run(run_dir, out_dir=other, overwrite=True)
    assert sorted(p.name for p in other.iterdir()) == before
    assert (run_dir / "adapter" / "adapter_config.json").is_file() and (run_dir / "recipe.yaml").is_file()


def test_evaluate_and_export_refuse_inputs_that_changed_since_training(run_dir):
    """Data edited after training would make evaluate score other "held-out" rows: refused, as --resume is."""
    path = run_dir / "fingerprints.json"
    saved = json.loads(path.read_text())
    key = next(k for k in saved if k.startswith("data:"))
    path.write_text(json.dumps({**saved, key: "sha256:" + "0" * 64}))
    line = _one_line(run_cli("evaluate", str(run_dir)))
    assert f"cannot evaluate {run_dir}: these inputs changed in content" in line and "held-out rows" in line
    with pytest.raises(RunFolderError, match="cannot export .* merge would use another base"):
        export_run(run_dir, merged=True)
    assert not (run_dir / "merged").exists() and not (run_dir / "evaluation.json").exists()


@pytest.mark.parametrize(
    "flag,value",
    [("--max-eval-pairs", "0"), ("--batch-size", "0"), ("--max-new-tokens", "-5"), ("--num-eval-samples", "-1")],
)
def test_evaluate_refuses_counts_out_of_range_in_one_line(run_dir, flag, value):
    line = _one_line(run_cli("evaluate", str(run_dir), flag, value))
    assert f"({flag}): must be an integer >= " in line and not (run_dir / "evaluation.json").exists()
