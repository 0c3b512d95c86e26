"""The private parts of TRL dpo_xpu reaches into (dpo_xpu.train.trl_internals) exist in the installed TRL.

This test is the one that fails, naming the TRL version, when a TRL release renames one of them; and no module
of the package but trl_internals touches them.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dpo_xpu.train import trl_internals

PACKAGE = Path(__file__).resolve().parents[1] / "dpo_xpu"
#: The private names of TRL / accelerate the package touches; only trl_internals may spell them.
PRIVATE = ("_use_triton", "_metrics", "_precompute_ref_logps", "_is_accelerate_prepared", "_load_from_checkpoint")


def test_the_installed_trl_has_every_private_name_dpo_xpu_uses() -> None:
    import trl

    problems = trl_internals.missing_internals()
    assert problems == [], f"TRL {trl.__version__} broke dpo_xpu's reach into it: {problems}"


def test_a_missing_name_is_reported_with_the_trl_version(monkeypatch: pytest.MonkeyPatch) -> None:
    import trl
    from trl import DPOTrainer

    one_x = trl_internals.trl_generation() == "1.x"
    name = "_compute_loss" if one_x else "get_batch_loss_metrics"
    monkeypatch.delattr(DPOTrainer, name)
    problems = trl_internals.missing_internals()
    assert problems == [f"trl {trl.__version__}: DPOTrainer has no method {name} (dpo_xpu overrides or calls it)"]
    with pytest.raises(RuntimeError, match=rf"trl {re.escape(trl.__version__)}: DPOTrainer has no method"):
        trl_internals.require_internals()


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
        if re.search(rf"\b{name}\b", path.read_text(encoding="utf-8"))
    ]
    assert offenders == []
