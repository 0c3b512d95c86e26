"""Losses: dpo_xpu's own (dpo_xpu.train.losses) against their equations written out here, the recipe -> TRL mapping per
TRL generation, and every loss's first-step value through run_training on the real stories260K + orca rows."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from helpers import config_kwargs
from helpers import cpu_recipe as shared_recipe

from dpo_xpu.errors import RecipeError
from dpo_xpu.pipeline import run_training
from dpo_xpu.recipes import Recipe
from dpo_xpu.train.losses import dpo_norm_loss, own_loss, sigmoid_loss, simpo_loss
from dpo_xpu.train.trl_config import own_loss_type, trl_generation

LN2 = math.log(2)
BETA = 0.1


# Fixed per-sequence log-probs (nats) and answer lengths (tokens) for 3 pairs.
PC = torch.tensor([-120.0, -80.5, -300.25], dtype=torch.float64)
PR = torch.tensor([-130.0, -70.0, -310.0], dtype=torch.float64)
RC = torch.tensor([-125.0, -79.0, -305.0], dtype=torch.float64)
RR = torch.tensor([-128.0, -72.0, -300.0], dtype=torch.float64)
NC = torch.tensor([40.0, 25.0, 100.0], dtype=torch.float64)
NR = torch.tensor([45.0, 20.0, 90.0], dtype=torch.float64)

# The first-step runs use the native backend's NF4 (bitsandbytes), which the ipex-llm environment does not have;
# there the file still checks each loss's equation and the refusals of its TRL generation.
requires_native_nf4 = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None or trl_generation() != "1.x",
    reason="native NF4 needs bitsandbytes >= 0.48 and TRL 1.x (the .venv environment, not .venv-ipex-llm)",
)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_dpo_is_eq7_of_rafailov_et_al():
    losses, chosen, rejected = sigmoid_loss(PC, PR, RC, RR, beta=BETA)
    for i in range(3):
        h = BETA * ((PC[i] - RC[i]) - (PR[i] - RR[i])).item()
        assert losses[i].item() == pytest.approx(-log_sigmoid(h), rel=1e-12)
        assert chosen[i].item() == pytest.approx(BETA * (PC[i] - RC[i]).item())
        assert rejected[i].item() == pytest.approx(BETA * (PR[i] - RR[i]).item())


def test_conservative_dpo_is_mitchells_smoothed_loss():
    eps = 0.1
    losses, _, _ = sigmoid_loss(PC, PR, RC, RR, beta=BETA, label_smoothing=eps)
    for i in range(3):
        h = BETA * ((PC[i] - RC[i]) - (PR[i] - RR[i])).item()
        expected = -(1 - eps) * log_sigmoid(h) - eps * log_sigmoid(-h)
        assert losses[i].item() == pytest.approx(expected, rel=1e-12)


def test_dpo_norm_divides_every_log_prob_by_its_length():
    losses, chosen, _ = dpo_norm_loss(PC, PR, RC, RR, NC, NR, beta=BETA, label_smoothing=0.05)
    for i in range(3):
        h = BETA * ((PC[i] - RC[i]) / NC[i] - (PR[i] - RR[i]) / NR[i]).item()
        assert losses[i].item() == pytest.approx(-0.95 * log_sigmoid(h) - 0.05 * log_sigmoid(-h), rel=1e-12)
        assert chosen[i].item() == pytest.approx(BETA * ((PC[i] - RC[i]) / NC[i]).item())


def test_simpo_is_eq6_of_meng_et_al():
    gamma = 0.5
    losses, chosen, rejected = simpo_loss(PC, PR, NC, NR, beta=2.0, gamma=gamma)
    for i in range(3):
        h = (2.0 / NC[i] * PC[i] - 2.0 / NR[i] * PR[i]).item() - gamma
        assert losses[i].item() == pytest.approx(-log_sigmoid(h), rel=1e-12)
        assert chosen[i].item() == pytest.approx((2.0 * PC[i] / NC[i]).item())
        assert rejected[i].item() == pytest.approx((2.0 * PR[i] / NR[i]).item())


def test_at_the_first_step_dpo_and_cdpo_give_ln2():
    for eps in (0.0, 0.1, 0.3):
        losses, _, _ = sigmoid_loss(PC, PR, PC, PR, beta=BETA, label_smoothing=eps)
        assert torch.allclose(losses, torch.full_like(losses, LN2))


def test_own_loss_dispatches_and_refuses_unknown_names():
    a = own_loss("simpo", PC, PR, RC, RR, NC, NR, beta=BETA, simpo_gamma=0.3)[0]
    assert torch.equal(a, simpo_loss(PC, PR, NC, NR, beta=BETA, gamma=0.3)[0])
    with pytest.raises(ValueError, match="no own loss"):
        own_loss("ipo", PC, PR, RC, RR, NC, NR, beta=BETA)


# ---- the recipe -> TRL mapping ----


@pytest.mark.parametrize(
    "overrides, loss_type, weights, own",
    [
        ({}, ["sigmoid"], None, None),
        ({"label_smoothing": 0.1}, ["sigmoid"], [0.0], "sigmoid"),
        ({"loss_type": "dpo_norm"}, ["sigmoid"], [0.0], "dpo_norm"),
        ({"loss_type": "dpo_norm", "label_smoothing": 0.1}, ["sigmoid"], [0.0], "dpo_norm"),
        ({"loss_type": "simpo"}, ["sigmoid"], [0.0], "simpo"),
        ({"loss_type": "ipo", "nll_loss_coef": 0.2}, ["ipo", "sft"], [1.0, 0.2], None),
        ({"loss_type": "simpo", "nll_loss_coef": 1.0}, ["sigmoid", "sft"], [0.0, 1.0], "simpo"),
        ({"loss_type": "robust", "label_smoothing": 0.2}, ["robust"], None, None),
    ],
)
def test_trl_1x_mapping(overrides, loss_type, weights, own):
    recipe = Recipe(**overrides)
    kwargs = config_kwargs(recipe, "1.x")
    assert kwargs["loss_type"] == loss_type
    assert kwargs.get("loss_weights") == weights
    assert own_loss_type(recipe.loss_type, recipe.label_smoothing, "1.x") == own
    assert "reference_free" not in kwargs and "rpo_alpha" not in kwargs


def test_trl_011_mapping_uses_its_own_label_smoothing_reference_free_and_rpo_alpha():
    kwargs = config_kwargs(Recipe(label_smoothing=0.1, reference_free=True, nll_loss_coef=0.5), "0.11")
    assert kwargs["loss_type"] == "sigmoid" and kwargs["label_smoothing"] == 0.1
    assert kwargs["reference_free"] is True and kwargs["rpo_alpha"] == 0.5
    assert config_kwargs(Recipe(), "0.11")["rpo_alpha"] is None


@pytest.mark.parametrize(
    "overrides, generation, field",
    [
        ({"loss_type": "simpo"}, "0.11", "loss_type"),
        ({"loss_type": "dpo_norm"}, "0.11", "loss_type"),
        ({"loss_type": "hinge", "label_smoothing": 0.1}, "1.x", "label_smoothing"),
        ({"loss_type": "ipo", "label_smoothing": 0.1}, "0.11", "label_smoothing"),
        ({"reference_free": True, "reference": "separate"}, "1.x", "reference"),
        ({"loss_type": "simpo", "reference": "precomputed"}, "1.x", "reference"),
        ({"reference": "separate", "reference_device": "cpu"}, "0.11", "reference_device"),
    ],
)
def test_settings_nothing_can_honour_are_refused(overrides, generation, field):
    with pytest.raises(RecipeError) as err:
        config_kwargs(Recipe(**overrides), generation)
    assert str(err.value).startswith(field) or f"{field}:" in str(err.value)
    if field in ("loss_type", "label_smoothing", "reference_device"):
        assert f"TRL {generation}" in str(err.value)


def test_installed_trl_accepts_the_own_loss_config(tmp_path):
    from trl import DPOConfig

    # TRL 1.x: an own loss with TRL's sft term; TRL 0.11: its own label smoothing, reference_free and rpo_alpha
    own = {"loss_type": "simpo"} if trl_generation() == "1.x" else {"label_smoothing": 0.1, "reference_free": True}
    recipe = Recipe(output_dir=str(tmp_path), bf16=False, nll_loss_coef=0.5, **own)
    config = DPOConfig(**config_kwargs(recipe, use_cpu=True))
    assert config.beta == 0.1


# ---- first-step values through run_training (policy == reference at step 1) ----


def first_step(stories260k_path, orca_rows_path, tmp_path_factory, **overrides):
    """One step on one real orca pair (batch 1, so the logged log-probs are that pair's)."""
    values = dict(max_steps=1, limit=1, per_device_train_batch_size=1, warmup_steps=0)
    values.update(overrides)
    out = tmp_path_factory.mktemp("loss") / "run"
    result = run_training(shared_recipe(stories260k_path, orca_rows_path, out, **values), live_plot=False)
    row = result.metrics[0]
    assert row["step"] == 1
    return row, result


def answer_lengths(result, max_length: int = 1024, index: int = 0) -> tuple[int, int]:
    """Answer tokens TRL scores for pair ``index`` (prompt + answer cut to max_length, keeping the start)."""
    example = result.trainer.train_dataset[index]
    room = max_length - len(example["prompt_ids"])
    return min(len(example["chosen_ids"]), room), min(len(example["rejected_ids"]), room)


def _fixture(**overrides):
    @pytest.fixture(scope="module")
    def run(stories260k_path, orca_rows_path, tmp_path_factory):
        return first_step(stories260k_path, orca_rows_path, tmp_path_factory, **overrides)

    return run


sigmoid_run = _fixture()
cdpo_run = _fixture(label_smoothing=0.1)
ipo_run = _fixture(loss_type="ipo")
hinge_run = _fixture(loss_type="hinge")
reference_free_run = _fixture(reference_free=True)
simpo_run = _fixture(loss_type="simpo", simpo_gamma=0.5)
dpo_norm_run = _fixture(loss_type="dpo_norm")
nll_run = _fixture(nll_loss_coef=0.5, per_device_train_batch_size=2, limit=2)


@pytest.mark.slow
@requires_native_nf4
def test_first_step_dpo_is_ln2(sigmoid_run):
    row, result = sigmoid_run
    assert row["loss"] == pytest.approx(LN2, abs=1e-5)
    from trl import DPOTrainer

    # TRL's own loss: TRL's trainer, or on TRL 1.x dpo_xpu's subclass for prefix sharing (prefix_sharing: auto)
    assert isinstance(result.trainer, DPOTrainer) and getattr(result.trainer, "own_loss_type", None) is None


@pytest.mark.slow
@requires_native_nf4
def test_first_step_conservative_dpo_is_ln2_through_dpo_xpu(cdpo_run, sigmoid_run):
    row, result = cdpo_run
    assert type(result.trainer).__name__ == "DpoXpuTrainer"
    assert row["loss"] == pytest.approx(LN2, abs=1e-5)
    assert row["rewards/chosen"] == pytest.approx(0.0, abs=1e-5)
    assert row["logps/chosen"] == pytest.approx(sigmoid_run[0]["logps/chosen"], abs=1e-3)


@pytest.mark.slow
@requires_native_nf4
def test_first_step_ipo_is_one_over_two_beta_squared(ipo_run):
    assert ipo_run[0]["loss"] == pytest.approx((1 / (2 * 0.1)) ** 2, rel=1e-5)  # 25


@pytest.mark.slow
@requires_native_nf4
def test_first_step_hinge_is_one(hinge_run):
    assert hinge_run[0]["loss"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.slow
@requires_native_nf4
def test_reference_free_dpo_uses_zero_reference_log_probs(reference_free_run):
    row, _ = reference_free_run
    h = BETA * (row["logps/chosen"] - row["logps/rejected"])
    assert math.isfinite(row["loss"])
    assert row["loss"] == pytest.approx(-log_sigmoid(h), rel=1e-4, abs=1e-6)
    assert row["rewards/chosen"] == pytest.approx(BETA * row["logps/chosen"], rel=1e-5)


@pytest.mark.slow
@requires_native_nf4
def test_simpo_matches_eq6_on_the_logged_log_probs(simpo_run):
    row, result = simpo_run
    n_chosen, n_rejected = answer_lengths(result)
    h = BETA * row["logps/chosen"] / n_chosen - BETA * row["logps/rejected"] / n_rejected - 0.5
    assert row["loss"] == pytest.approx(-log_sigmoid(h), rel=1e-4)
    assert row["rewards/chosen"] == pytest.approx(BETA * row["logps/chosen"] / n_chosen, rel=1e-4)


@pytest.mark.slow
@requires_native_nf4
def test_first_step_dpo_norm_is_ln2_through_dpo_xpu(dpo_norm_run):
    row, result = dpo_norm_run
    assert type(result.trainer).__name__ == "DpoXpuTrainer" and result.trainer.own_loss_type == "dpo_norm"
    assert row["loss"] == pytest.approx(LN2, abs=1e-5)
    assert row["step0/logratio_gap"] == pytest.approx(0.0, abs=1e-5) and "step0/warning" not in row


@pytest.mark.slow
@requires_native_nf4
def test_nll_term_is_the_token_mean_nll_of_the_chosen_answers_of_the_micro_batch(nll_run):
    """TRL's ``sft`` term (``rpo_alpha`` on TRL 0.11): -sum of the chosen answers' token log-probs over the micro-batch
    / their token count, not OpenRLHF's mean of per-pair means. Batch 2: the logged ``logps/chosen`` is the mean of
    the two summed log-probs."""
    row, result = nll_run
    lengths = [answer_lengths(result, index=i)[0] for i in range(2)]
    assert lengths[0] != lengths[1]  # where the token mean and the per-pair mean differ
    token_mean_nll = -(2 * row["logps/chosen"]) / sum(lengths)
    assert row["loss"] == pytest.approx(LN2 + 0.5 * token_mean_nll, rel=1e-4)


def two_steps_on_one_pair(stories260k_path, orca_rows_path, tmp_path, **overrides):
    """Two steps on the same pair: step 1's policy is the reference, so step 1's summed log-probs are the
    reference's for step 2 (the first step is exact: see the ln 2 tests)."""
    values = dict(max_steps=2, limit=1, per_device_train_batch_size=1, warmup_steps=0, learning_rate=5e-3)
    values.update(overrides)
    recipe = shared_recipe(stories260k_path, orca_rows_path, tmp_path / "run", **values)
    result = run_training(recipe, live_plot=False)
    first, second = [r for r in result.metrics if "loss" in r]
    return first, second, answer_lengths(result)


@pytest.mark.slow
@requires_native_nf4
@pytest.mark.parametrize(
    "overrides, averaged",
    [
        (dict(loss_type="sigmoid"), False),
        (dict(loss_type="ipo"), True),
        (dict(loss_type="dpo_norm"), True),
        (dict(loss_type="dpo_norm", label_smoothing=0.1), True),
    ],
    ids=["sigmoid", "ipo", "dpo_norm", "dpo_norm-smoothed"],
)
def test_rewards_are_what_the_loss_compares(stories260k_path, orca_rows_path, tmp_path, overrides, averaged):
    """rewards/* = beta * the log-ratio the loss acts on: summed for sigmoid, length-averaged for ipo and dpo_norm
    (TRL 1.x's own ipo and sigmoid_norm log summed ones), whatever the label smoothing."""
    first, second, lengths = two_steps_on_one_pair(stories260k_path, orca_rows_path, tmp_path, **overrides)
    n_chosen, n_rejected = lengths
    chosen_ratio = second["logps/chosen"] - first["logps/chosen"]
    rejected_ratio = second["logps/rejected"] - first["logps/rejected"]
    if averaged:
        chosen_ratio, rejected_ratio = chosen_ratio / n_chosen, rejected_ratio / n_rejected
    assert abs(chosen_ratio) > 1e-3  # the policy moved, so the test can tell the two normalisations apart
    assert second["rewards/chosen"] == pytest.approx(BETA * chosen_ratio, rel=1e-3, abs=1e-6)
    assert second["rewards/rejected"] == pytest.approx(BETA * rejected_ratio, rel=1e-3, abs=1e-6)
    assert second["rewards/accuracies"] == float(chosen_ratio > rejected_ratio)
