"""Known-harmless messages are filtered by their exact text, and nothing else is."""

from __future__ import annotations

import logging
import warnings

import dpo_xpu  # noqa: F401 - importing the package installs the filters
from dpo_xpu.log_filters import BNB_KERNELS_MESSAGE


def test_the_bitsandbytes_kernels_line_is_dropped_and_other_lines_are_not(caplog):
    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        log.warning(BNB_KERNELS_MESSAGE + ": %s. Please make sure you already `pip install kernels`", "no network")
        log.warning("some other bitsandbytes warning")
    assert BNB_KERNELS_MESSAGE not in caplog.text
    assert "some other bitsandbytes warning" in caplog.text


def test_the_offline_kernels_line_is_dropped_at_every_start(tmp_path):
    import os
    import subprocess
    import sys

    # the line comes from importing bitsandbytes with HF_HUB_OFFLINE=1 (kernels' hub check), as the docs advise
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    code = "import dpo_xpu, logging, bitsandbytes; logging.getLogger('kernels._internals.hf_hub').warning('kept')"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Skipping publisher trust check" not in result.stderr
    assert "kept" in result.stderr


def test_the_checkpoint_ordering_line_is_dropped():
    from transformers.utils import logging as hf_logging

    log = hf_logging.get_logger("transformers.trainer_utils")
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # transformers' loggers do not propagate
    log.addHandler(handler)
    try:
        log.warning("mtime may not be reliable on this filesystem, falling back to numerical ordering")
        log.warning("another transformers line")
    finally:
        log.removeHandler(handler)
    assert seen == ["another transformers line"]


def test_only_the_checkpointing_deprecations_are_silenced():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        dpo_xpu.log_filters.install()
        warnings.warn(
            "`gradient_checkpointing_enable` is deprecated and will be removed in v6.", FutureWarning, stacklevel=1
        )
        warnings.warn(
            "`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning, stacklevel=1
        )
        warnings.warn("something else is deprecated", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something else is deprecated"]


def test_user_errors_show_as_one_line_in_a_notebook():
    from dpo_xpu.errors import ModelLoadError

    assert ModelLoadError("model folder x does not exist")._render_traceback_() == [
        "ModelLoadError: model folder x does not exist"
    ]
