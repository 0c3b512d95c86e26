"""Training end to end on real input: the 284 real orca rows and the pretrained stories260K (NF4 + LoRA)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import cpu_recipe as shared_recipe

from dpo_xpu.models.loading import load_tokenizer, load_trained_policy
from dpo_xpu.pipeline import run_training

LN2 = math.log(2)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained(stories260k_path, orca_rows_path, tmp_path_factory):
    recipe = shared_recipe(stories260k_path, orca_rows_path, tmp_path_factory.mktemp("run") / "shared-run")
    return recipe, run_training(recipe, live_plot=False)


@pytest.mark.slow
def test_first_step_is_ln2_with_zero_rewards(trained):
    _, result = trained
    first = result.metrics[0]
    assert first["step"] == 1
    assert first["loss"] == pytest.approx(LN2, abs=0.01)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert first[key] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.slow
def test_all_logged_values_are_finite_and_training_separates_pairs(trained):
    recipe, result = trained
    rows = [r for r in result.metrics if "loss" in r]
    assert len(rows) == recipe.max_steps
    for row in rows:
        for key, value in row.items():
            assert isinstance(value, (int, float)) and math.isfinite(value), (row["step"], key, value)
    last = rows[-1]
    assert last["rewards/accuracies"] > 0.5
    assert last["rewards/margins"] > 0
    assert min(r["loss"] for r in rows[-5:]) < LN2


@pytest.mark.slow
def test_every_step_logs_its_throughput_and_mfu(trained):
    """perf/* in each train row of metrics.jsonl (issue #25 point 3): pairs/s from the step's wall time and the global
    batch, tokens/s from TRL's token count, MFU against the measured matmul ceiling, a share in (0, 1)."""
    recipe, result = trained
    rows = [r for r in result.metrics if "loss" in r]
    batch = recipe.per_device_train_batch_size * recipe.gradient_accumulation_steps
    for row in rows:
        assert row["perf/pairs_per_s"] == pytest.approx(batch / row["perf/step_s"], rel=1e-3)
        assert row["perf/tokens_per_s"] > row["perf/pairs_per_s"] * 2  # two sequences of many tokens a pair
        assert 0 < row["perf/mfu"] < 1


@pytest.mark.slow
def test_run_folder_holds_everything(trained):
    _, result = trained
    run = result.run_dir
    for name in ("recipe.yaml", "environment.json", "metrics.jsonl", "reward_curves.png"):
        assert (run / name).is_file(), name
    assert (run / "reward_curves.png").read_bytes()[:8] == PNG_MAGIC
    assert json.loads((run / "environment.json").read_text())["backend"] == "native"
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer_config.json"):
        assert (result.adapter_dir / name).is_file(), name
    assert not (result.adapter_dir / "ref").exists()
    card = (result.adapter_dir / "README.md").read_text()
    assert result.trainer.decisions and all(f"- {line}" in card for line in result.trainer.decisions)
    # every file with the user's umask (safetensors alone writes 600), so the group can read the adapter too
    from dpo_xpu.files import current_umask

    expected = 0o666 & ~current_umask()
    assert {p.name: p.stat().st_mode & 0o777 for p in result.adapter_dir.iterdir() if p.is_file()} == {
        p.name: expected for p in result.adapter_dir.iterdir() if p.is_file()
    }


@pytest.mark.slow
def test_saved_adapter_reproduces_the_trained_logits(trained, stories260k_path):
    recipe, result = trained
    tok = load_tokenizer(stories260k_path)
    inputs = tok(["<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n4"], return_tensors="pt")
    trained_model = result.trainer.model
    trained_model.eval()
    reloaded = load_trained_policy(stories260k_path, result.adapter_dir, "nf4", "cpu", dtype=torch.float32)
    with torch.no_grad():
        expected = trained_model(**inputs).logits
        got = reloaded(**inputs).logits
        with trained_model.disable_adapter():
            base = trained_model(**inputs).logits
    assert (expected - base).abs().max() > 1e-3  # the adapter really changed the model
    assert (expected - got).abs().max() < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize(
    "reference, prefix_sharing",
    [("adapter-off", False), ("precomputed", False), ("precomputed", True)],
)
def test_the_step0_check_holds_in_bf16(
    stories260k_path, orca_rows_path, tmp_path, monkeypatch, reference, prefix_sharing
):
    """In bf16 too the reference computes what the policy computes before the first update: loss ln 2 within 1e-3,
    rewards 0 (a precomputed reference in length-sorted batches, and packed with prefix sharing, included)."""
    monkeypatch.setenv("DPO_XPU_CACHE_DIR", str(tmp_path / "cache"))
    recipe = shared_recipe(
        stories260k_path,
        orca_rows_path,
        tmp_path / reference,
        reference=reference,
        prefix_sharing=prefix_sharing,
        bf16=True,
        max_steps=1,
        limit=8,
    )
    first = run_training(recipe, live_plot=False).metrics[0]
    assert first["loss"] == pytest.approx(LN2, abs=1e-3)
    assert first["step0/logratio_gap"] <= 1e-3 and "step0/warning" not in first


@pytest.mark.slow
def test_separate_and_adapter_off_agree_at_the_first_step(stories260k_path, orca_rows_path, tmp_path):
    firsts = {}
    for reference in ("adapter-off", "separate"):
        recipe = shared_recipe(
            stories260k_path, orca_rows_path, tmp_path / reference, reference=reference, max_steps=1, limit=8
        )
        firsts[reference] = run_training(recipe, live_plot=False).metrics[0]
    a, b = firsts["adapter-off"], firsts["separate"]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen"):
        assert a[key] == pytest.approx(b[key], abs=1e-5), key


@pytest.mark.slow
def test_precomputed_reference_matches_adapter_off_and_reuses_its_cache(
    stories260k_path, orca_rows_path, tmp_path, monkeypatch
):
    monkeypatch.setenv("DPO_XPU_CACHE_DIR", str(tmp_path / "cache"))
    runs = {}
    for name, reference in (("adapter-off", "adapter-off"), ("cold", "precomputed"), ("warm", "precomputed")):
        recipe = shared_recipe(
            stories260k_path,
            orca_rows_path,
            tmp_path / name,
            reference=reference,
            max_steps=3,
            limit=6,
            learning_rate=1e-2,
            warmup_steps=0,
        )
        runs[name] = run_training(recipe, live_plot=False).metrics
        if name == "cold":
            assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1  # the warm run reused the file
    for step in range(3):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins"):
            expected = runs["adapter-off"][step][key]
            assert runs["cold"][step][key] == pytest.approx(expected, abs=1e-4), (step, key)
            assert runs["warm"][step][key] == pytest.approx(expected, abs=1e-4), (step, key)
    assert runs["adapter-off"][2]["loss"] != pytest.approx(runs["adapter-off"][0]["loss"], abs=1e-3)  # it trained
