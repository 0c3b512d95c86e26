"""Freed host memory handed back to the OS after training forward passes on the CPU (glibc ``malloc_trim``)."""

from __future__ import annotations

import pytest
import torch

from dpo_xpu.train import host_memory


def test_trims_after_forward_with_gradients_only(monkeypatch):
    calls = []
    monkeypatch.setattr(host_memory, "_malloc_trim", lambda: lambda pad: calls.append(pad))
    model = torch.nn.Linear(4, 4)
    handle = host_memory.release_after_training_forward(model)
    model(torch.ones(1, 4))
    assert calls == [0]
    with torch.no_grad():  # generation and the reference precompute: left alone
        model(torch.ones(1, 4))
    assert calls == [0]
    handle.remove()
    model(torch.ones(1, 4))
    assert calls == [0]


def test_without_glibc_nothing_is_hooked(monkeypatch):
    monkeypatch.setattr(host_memory, "_malloc_trim", lambda: None)
    assert host_memory.release_freed_memory() is False
    assert host_memory.release_after_training_forward(torch.nn.Linear(2, 2)) is None


def test_the_hook_keeps_the_output():
    if host_memory._malloc_trim() is None:
        pytest.skip("glibc's malloc_trim is not available")
    model = torch.nn.Linear(3, 2)
    x = torch.randn(5, 3)
    expected = model(x)
    host_memory.release_after_training_forward(model)
    assert torch.equal(model(x), expected)


def test_allocated_mib_counts_a_live_tensor_and_not_a_freed_one():
    if host_memory.allocated_mib() is None:
        pytest.skip("glibc's mallinfo2 is not available")
    before = host_memory.allocated_mib()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB of float32
    held = host_memory.allocated_mib() - before
    del block
    after = host_memory.allocated_mib() - before
    assert held == pytest.approx(64, abs=4)
    assert after < 4


def test_without_glibc_no_allocation_figure(monkeypatch):
    monkeypatch.setattr(host_memory, "_mallinfo2", lambda: None)
    assert host_memory.allocated_mib() is None
