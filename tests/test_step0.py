"""The step-0 check (dpo_xpu.train.step0): what the first logged step must show, and how a gap is reported."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from dpo_xpu.callbacks.metrics import MetricsLoggerCallback
from dpo_xpu.train.step0 import (
    GAP_KEY,
    WARNING_KEY,
    Step0Check,
    describe_step0,
    dtype_mismatches,
    expected_step0_loss,
    step0_causes,
)

LN2 = math.log(2)


def test_expected_loss_at_a_zero_margin():
    assert expected_step0_loss("sigmoid", 0.1) == pytest.approx(LN2)
    assert expected_step0_loss("dpo_norm", 0.5) == pytest.approx(LN2)
    assert expected_step0_loss("hinge", 0.1) == 1.0
    assert expected_step0_loss("ipo", 0.1) == pytest.approx(25.0)  # (1 / (2 beta))^2
    assert expected_step0_loss("sigmoid", 0.1, nll_loss_coef=0.5) is None  # the NLL term depends on the data
    assert expected_step0_loss("robust", 0.1) is None


def test_equal_policy_and_reference_pass_without_a_warning(caplog):
    check = Step0Check(beta=0.1, expected_loss=LN2)
    with caplog.at_level(logging.WARNING):
        out = check({"loss": LN2, "rewards/chosen": 0.0, "rewards/rejected": 2e-5})
    assert out == {GAP_KEY: pytest.approx(2e-4)}
    assert caplog.text == ""


def test_a_gap_is_measured_in_nats_and_reported_once_with_the_cause(caplog):
    check = Step0Check(beta=0.1, expected_loss=LN2, causes=["the reference is bfloat16", "another"])
    with caplog.at_level(logging.WARNING):
        out = check({"loss": 0.6556, "rewards/chosen": 0.333, "rewards/rejected": 0.255})
    assert out[GAP_KEY] == pytest.approx(3.33)
    message = out[WARNING_KEY]
    assert "3.33 nats" in message and "0.6556 instead of 0.6931" in message
    assert "biased" in message and message.endswith("Likely cause: the reference is bfloat16")
    assert caplog.text.count("step-0 check") == 1


def test_a_loss_off_its_zero_margin_value_warns_even_with_zero_rewards():
    out = Step0Check(beta=0.1, expected_loss=1.0)({"loss": 0.9, "rewards/chosen": 0.0, "rewards/rejected": 0.0})
    assert out[GAP_KEY] == 0.0 and WARNING_KEY in out


def test_a_row_without_rewards_is_not_checked():
    assert Step0Check(beta=0.1, expected_loss=LN2)({"loss": 0.7}) == {}


class Tiny(torch.nn.Module):
    def __init__(self, norm_dtype: torch.dtype) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(4, 2)
        self.norm = torch.nn.LayerNorm(2).to(norm_dtype)


class PeftLike(torch.nn.Module):
    """Parameter names as PEFT gives them: ``base_model.model.`` prefix, ``base_layer``, LoRA matrices."""

    def __init__(self) -> None:
        super().__init__()
        self.base_model = torch.nn.Module()
        self.base_model.model = Tiny(torch.float32)
        self.base_model.model.lora_A = torch.nn.Linear(2, 1).to(torch.bfloat16)


def test_dtype_mismatches_compare_the_same_parameters_by_name():
    policy, reference = PeftLike(), Tiny(torch.bfloat16)
    lines = dtype_mismatches(policy, reference)
    assert lines == ["norm.weight: policy float32, reference bfloat16", "norm.bias: policy float32, reference bfloat16"]
    assert dtype_mismatches(Tiny(torch.float32), Tiny(torch.float32)) == []


def test_causes_name_the_dtype_first_for_a_separate_reference():
    causes = step0_causes(PeftLike(), Tiny(torch.bfloat16), "cpu", backend="ipex-llm")
    assert causes[0].startswith("the separate reference was loaded in another dtype than the policy: norm.weight")
    assert "(and 1 more)" in causes[0] and "ipex-llm example" in causes[0]
    no_gc = step0_causes(PeftLike(), None, "cpu", backend="ipex-llm", gradient_checkpointing=False)
    assert "training kernel" in no_gc[0] and "gradient_checkpointing: true" in no_gc[0]


def test_a_bf16_run_names_rounding_in_other_batch_shapes_and_a_float32_one_does_not():
    bf16 = step0_causes(PeftLike(), None, "cpu", bf16=True)
    assert bf16[0].startswith("bf16 rounding") and "bf16: false" in bf16[0]
    assert not any("bf16 rounding" in cause for cause in step0_causes(PeftLike(), None, "cpu", bf16=False))


def test_the_metrics_logger_adds_the_check_to_the_step1_row_only(tmp_path):
    class State:
        global_step, epoch = 1, 0.1

    logger = MetricsLoggerCallback(tmp_path, step0=Step0Check(beta=0.1, expected_loss=LN2))
    logs = {"loss": 0.70, "rewards/chosen": 0.01, "rewards/rejected": 0.0}
    logger.on_log(None, State, None, logs=logs)
    State.global_step = 2
    logger.on_log(None, State, None, logs=logs)
    first, second = (json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines())
    assert first[GAP_KEY] == pytest.approx(0.1) and WARNING_KEY in first
    assert GAP_KEY not in second and WARNING_KEY not in second
    assert describe_step0([first, second]) == first[WARNING_KEY]
    assert describe_step0([second]).startswith("step-0 check: not made")
    ok = {"loss": LN2, GAP_KEY: 0.0}
    assert describe_step0([ok]).startswith("step-0 check: ok")


def test_a_stale_precomputed_reference_is_recomputed_before_the_first_step(
    stories260k_path, orca_rows_path, tmp_path, monkeypatch, caplog
):
    """A cache file with the right key but the log-probs of other weights (what a rewrite of the model in place left
    before the key covered content) used to be read as it is: the step-0 check then warned ("differ by 11.88 nats
    ... loss 1.2162 instead of 0.6931") and the run trained on biased rewards. Now a cache hit is checked against the
    reference before training, recomputed, and step 1 shows rewards 0 and loss ln 2."""
    import dataclasses

    from helpers import make_trainer, short_recipe

    from dpo_xpu.files import CACHE_DIR_ENV
    from dpo_xpu.train.reference_cache import load_reference_logps, save_reference_logps

    pytest.importorskip("trl")
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    recipe = short_recipe(stories260k_path, orca_rows_path, tmp_path / "first", reference="precomputed", max_steps=1)
    first = make_trainer(recipe)
    info = first.reference_cache_info
    chosen, rejected, _ = load_reference_logps(info.path, info.key, info.rows)
    save_reference_logps(info.path, chosen + 5.0, rejected - 5.0, info.key, info.components)  # valid, but stale

    with caplog.at_level(logging.WARNING):
        second = make_trainer(dataclasses.replace(recipe, output_dir=str(tmp_path / "second")))
    assert second.train_dataset["ref_chosen_logps"] == first.train_dataset["ref_chosen_logps"]
    again = second.reference_cache_info
    assert again.stale and again.rebuilt and not again.hit and "is stale" in caplog.text
    assert load_reference_logps(info.path, info.key, info.rows)[0].tolist() == chosen.tolist()  # rewritten

    second.train()
    step1 = json.loads((tmp_path / "second" / "metrics.jsonl").read_text().splitlines()[0])
    assert step1[GAP_KEY] < 1e-3 and WARNING_KEY not in step1, step1
    assert step1["loss"] == pytest.approx(LN2, abs=1e-3)
