"""metrics.jsonl writing and the reward-curve plots, outside Jupyter."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from dpo_xpu.callbacks.metrics import LiveRewardPlotCallback, MetricsLoggerCallback
from dpo_xpu.outputs.plotting import plot_reward_curves, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _log(cb, step, logs):
    cb.on_log(None, SimpleNamespace(global_step=step, epoch=step / 10), None, logs=logs)


def _fake_run(tmp_path, steps=4):
    cb = MetricsLoggerCallback(tmp_path)
    for step in range(1, steps + 1):
        _log(
            cb,
            step,
            {
                "loss": math.log(2) - 0.05 * step,
                "rewards/chosen": 0.1 * step,
                "rewards/rejected": -0.1 * step,
                "rewards/margins": 0.2 * step,
                "rewards/accuracies": 1.0,
                "learning_rate": 1e-4,
                "entropy": 2.0,
            },
        )
    _log(cb, steps, {"eval_loss": 0.5, "eval_rewards/margins": 0.3})
    _log(cb, steps, {"train_runtime": 1.0, "train_loss": 0.6})
    return cb


def test_metrics_rows_use_trl_names_and_skip_the_summary(tmp_path):
    _fake_run(tmp_path)
    rows = read_metrics(tmp_path)
    assert len(rows) == 5  # 4 train rows + 1 eval row, no summary row
    assert rows[0]["step"] == 1 and rows[0]["loss"] == math.log(2) - 0.05
    assert "entropy" not in rows[0] and "elapsed_s" in rows[0]
    assert rows[-1] == {**rows[-1], "eval/loss": 0.5, "eval/rewards/margins": 0.3}


def test_non_finite_values_stay_visible(tmp_path):
    cb = MetricsLoggerCallback(tmp_path)
    _log(cb, 1, {"loss": float("nan")})
    line = (tmp_path / "metrics.jsonl").read_text()
    assert json.loads(line)["loss"] == "nan"


def test_read_metrics_skips_a_half_written_last_line(tmp_path):
    _fake_run(tmp_path)
    with (tmp_path / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 9, "lo')
    assert read_metrics(tmp_path)[-1]["step"] == 4


def test_read_metrics_and_plot_skip_lines_that_are_not_rows(tmp_path):
    """Lines a hand edit or a damaged disk leaves (JSON that is no row, bytes that are not UTF-8) are skipped."""
    _fake_run(tmp_path)
    rows = read_metrics(tmp_path)
    with (tmp_path / "metrics.jsonl").open("ab") as handle:
        handle.write(b'5\n[1, 2]\nnull\n{"step": "3"}\n{"step": true}\n{"loss": 1}\n\xff\xfe{"step": 8}\n')
    assert read_metrics(tmp_path) == rows
    assert len(plot_reward_curves(tmp_path).axes[0].lines) > 0


def test_plot_has_four_panels_with_data(tmp_path):
    _fake_run(tmp_path)
    fig = plot_reward_curves(tmp_path, out_path=tmp_path / "c.png")
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["Rewards", "Reward margin", "Reward accuracy", "DPO loss"]
    assert len(fig.axes[0].lines) == 2  # chosen and rejected
    assert list(fig.axes[1].lines[0].get_xdata()) == [1, 2, 3, 4]
    assert (tmp_path / "c.png").read_bytes()[:8] == PNG_MAGIC


def test_live_callback_draws_and_saves_without_a_display(tmp_path):
    _fake_run(tmp_path)
    live = LiveRewardPlotCallback(tmp_path, display=False)
    live.on_log(None, None, None, logs={})
    assert live.redraws == 1
    assert (tmp_path / "reward_curves.png").read_bytes()[:8] == PNG_MAGIC


def test_live_callback_updates_one_display_in_place(tmp_path, monkeypatch):
    import IPython.display as ipd

    shown, updates = [], []

    class Handle:
        def update(self, obj):
            updates.append(obj)

    def fake_display(obj, display_id=None):
        shown.append(obj)
        return Handle()

    monkeypatch.setattr(ipd, "display", fake_display)
    _fake_run(tmp_path)
    live = LiveRewardPlotCallback(tmp_path, display=True, max_share=1.0)  # every logging step
    for _ in range(3):
        live.on_log(None, None, None, logs={})
    assert len(shown) == 1 and len(updates) == 2
    assert shown[0].data[:8] == PNG_MAGIC


def test_live_callback_keeps_redrawing_under_its_share_of_the_wall_time(tmp_path):
    """A redraw costs about half a second: back-to-back logging steps (a fast GPU) redraw once, a step after
    enough time redraws again, and the end of training always does."""
    _fake_run(tmp_path)
    live = LiveRewardPlotCallback(tmp_path, display=False, max_share=0.05)
    for _ in range(3):
        live.on_log(None, None, None, logs={})
    assert live.redraws == 1
    live._last_end -= 40 * live._cost  # time passes: 40 redraws' worth, more than 1 / 0.05 = 20
    live.on_log(None, None, None, logs={})
    assert live.redraws == 2
    live.on_train_end(None, None, None)
    assert live.redraws == 3


def test_live_callback_before_any_row_draws_nothing(tmp_path):
    live = LiveRewardPlotCallback(tmp_path, display=False)
    assert live.redraw() is None
    assert not (tmp_path / "reward_curves.png").exists()


def test_peak_memory_is_each_windows_own_peak():
    """perf/peak_memory_mib: the peak since the last reading, then reset (on CPU the process's peak resident memory,
    where Linux lets it be reset): a 64 MiB block freed inside a window counts in that window only."""
    import torch

    from dpo_xpu.train.throughput import ThroughputMeter, peak_memory_mib

    if peak_memory_mib("cpu") is None:
        pytest.skip("no resettable peak resident memory on this OS (Linux's /proc/self/clear_refs)")
    meter = ThroughputMeter(config=None, pairs_per_step=2, device="cpu")
    meter.start()
    block = torch.ones(64 * 2**20 // 4)  # written, so resident; freed at once (glibc returns blocks this large)
    del block
    first = meter.values(1, None)["perf/peak_memory_mib"]
    second = meter.values(2, None)["perf/peak_memory_mib"]
    assert second > 0
    assert first > second + 48


def test_step_line_shows_throughput_and_peak_memory():
    from dpo_xpu.callbacks.metrics import step_line

    logs = {"loss": 0.6931, "perf/pairs_per_s": 0.25, "perf/mfu": 0.123, "perf/peak_memory_mib": 1234.4}
    line = step_line(logs, SimpleNamespace(global_step=3, max_steps=10))
    assert line == "step 3/10  loss 0.6931  pairs/s 0.25  MFU 12.3%  peak MiB 1,234"
