"""The private parts of TRL, transformers, accelerate, PEFT and bitsandbytes dpo_xpu reaches into
(dpo_xpu.train.trl_internals) exist in the installed versions.

This test is the one that fails, naming the installed versions, when a release renames one of them; no module of the
package but trl_internals touches them; TRL's answer-tokens switch is restored after use.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dpo_xpu.train import trl_internals

PACKAGE = Path(__file__).resolve().parents[1] / "dpo_xpu"
#: The private names of the libraries the package touches; only trl_internals may spell them.
PRIVATE = (
    "_use_triton",
    "_metrics",
    "_precompute_ref_logps",
    "_is_accelerate_prepared",
    "_load_from_checkpoint",
    "_compute_loss",
    "_attn_implementation",
    "_name_or_path",
    "_commit_hash",
    "_create_new_module",
    "_CHUNKED_LOGPROB_CHUNK_SIZE",
    "support_avx512bf16_for_cpu",
    "completion_mask",
    "fused_lm_head",
    "shift_labels",
)
#: The exceptions, each with its reason: the override TRL calls by that name, and the models layer, which sits
#: below trl_internals (train) and may not import it; trl_internals checks these names all the same.
ALLOWED = {
    "train/trainer.py": {"_compute_loss"},
    "models/backends/native.py": {"support_avx512bf16_for_cpu", "_name_or_path"},
}


def test_the_installed_libraries_have_every_private_name_dpo_xpu_uses() -> None:
    problems = trl_internals.missing_internals()
    assert problems == [], f"{trl_internals.installed_versions()} broke dpo_xpu's reach into them: {problems}"


def test_a_missing_name_is_reported_with_the_trl_version(monkeypatch: pytest.MonkeyPatch) -> None:
    import trl
    from trl import DPOTrainer

    one_x = trl_internals.trl_generation() == "1.x"
    name = "_compute_loss" if one_x else "get_batch_loss_metrics"
    monkeypatch.delattr(DPOTrainer, name)
    problems = trl_internals.missing_internals()
    assert problems == [f"trl {trl.__version__}: DPOTrainer has no method {name} (dpo_xpu overrides or calls it)"]
    with pytest.raises(RuntimeError, match=rf"trl {re.escape(trl.__version__)}: DPOTrainer has no method") as raised:
        trl_internals.require_internals()
    assert trl_internals.installed_versions() in str(raised.value)
    for library in ("trl", "transformers", "peft", "bitsandbytes"):
        assert f"{library} " in trl_internals.installed_versions()


def test_a_built_trainer_lacking_an_attribute_is_reported() -> None:
    if trl_internals.trl_generation() != "1.x":
        pytest.skip("TRL 0.11: the 1.x names are not used")

    class Built:
        precompute_ref_logps = False

    assert [p.split(": ", 1)[1] for p in trl_internals.missing_internals(Built())] == [
        "a built DPOTrainer has no attribute _metrics"
    ]


def test_only_trl_internals_spells_the_private_names() -> None:
    offenders = [
        f"{path.relative_to(PACKAGE)}: {name}"
        for path in PACKAGE.rglob("*.py")
        if path.name != "trl_internals.py"
        for name in PRIVATE
        if name not in ALLOWED.get(path.relative_to(PACKAGE).as_posix(), ())
        and re.search(rf"\b{name}\b", path.read_text(encoding="utf-8"))
    ]
    assert offenders == []


def test_the_cpu_lm_head_switches_are_restored_and_scoped_to_one_trainer() -> None:
    trl_utils = pytest.importorskip("trl.trainer.utils")
    if not hasattr(trl_utils, "_use_triton"):
        pytest.skip("this TRL has no fused LM head (TRL 0.11)")
    import torch

    cpu = torch.device("cpu")
    before, chunk = trl_utils._use_triton, trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE
    assert chunk > trl_internals.CPU_LOGPROB_CHUNK
    with trl_internals.cpu_lm_head() as switched:
        assert switched and trl_utils._use_triton(cpu)
        assert trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE == trl_internals.CPU_LOGPROB_CHUNK
        with trl_internals.cpu_lm_head():
            assert trl_utils._use_triton(cpu)
        assert trl_utils._use_triton(cpu) and trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE == trl_internals.CPU_LOGPROB_CHUNK
    assert trl_utils._use_triton is before and not before(cpu)
    assert trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE == chunk

    class Trainer:
        def train(self) -> tuple[bool, int]:
            return trl_utils._use_triton(cpu), trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE

        def evaluate(self) -> tuple[bool, int]:
            return self.train()

    trainer, other = Trainer(), Trainer()
    trl_internals.cpu_lm_head_for(trainer)
    assert trainer.train() == trainer.evaluate() == (True, trl_internals.CPU_LOGPROB_CHUNK)
    assert other.train() == (False, chunk) and trl_utils._use_triton is before


def test_narrow_cpu_tiles_give_trl_s_log_probs_and_gradients() -> None:
    """TRL's chunked log-prob function with dpo_xpu's CPU tile width against TRL's own, on a vocabulary several
    tiles wide whose last tile is partial: log-probs, entropies and both gradients agree to float rounding."""
    kernels = pytest.importorskip("trl.kernels.chunked_logprob")
    import torch

    generator = torch.Generator().manual_seed(0)
    vocab = 2 * trl_internals.CPU_LOGPROB_CHUNK + 301
    weight = (torch.randn(vocab, 48, generator=generator) * 0.3).requires_grad_()
    hidden = torch.randn(37, 48, generator=generator).requires_grad_()
    targets = torch.randint(0, vocab, (37,), generator=generator)
    grad_out = torch.randn(37, generator=generator)
    results = []
    for chunk in (trl_internals.LOGPROB_TILE[1], trl_internals.CPU_LOGPROB_CHUNK):
        hidden.grad = weight.grad = None
        log_probs, entropy, *_ = kernels.ChunkedLogProbFunction.apply(
            hidden, weight, None, targets, 1.0, chunk, None, 1.0, ("entropy",)
        )
        (log_probs * grad_out).sum().backward()
        results.append((log_probs.detach(), entropy.detach(), hidden.grad.clone(), weight.grad.clone()))
    for wide, narrow in zip(*results, strict=True):
        torch.testing.assert_close(narrow, wide, rtol=1e-5, atol=1e-5)
    assert results[0][2].abs().sum() > 0 and results[0][0].max() < 0


def test_a_reach_without_a_signature_is_reported_with_its_library_version(monkeypatch: pytest.MonkeyPatch) -> None:
    if trl_internals.trl_generation() != "1.x":
        pytest.skip("TRL 0.11: the 1.x names are not used")
    import accelerate

    gone = ("accelerate.accelerator", "Accelerator", ("_a_name_accelerate_never_had",))
    monkeypatch.setattr(trl_internals, "SOURCE_NAMES_1X", (*trl_internals.SOURCE_NAMES_1X, gone))
    assert trl_internals.missing_internals() == [
        f"accelerate {accelerate.__version__}: accelerate.accelerator.Accelerator no longer uses "
        "_a_name_accelerate_never_had"
    ]
