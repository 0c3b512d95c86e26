"""More than one device (#14): ``dpo-xpu train`` under ``torchrun`` with two gloo processes on the CPU.

Two processes x batch 1 must train what one process x batch 1 x 2 accumulation steps trains on the same rows
and seed (DDP averages the two ranks' gradients as accumulation averages the two micro-batches); rank 0 alone
writes the run folder; the ``precomputed`` reference is computed once; a SIGTERM to one rank stops both at the same
step, and ``--resume`` under two processes finishes the run as the uninterrupted one. Two ``torchrun`` launchers
simulate two nodes (#25): the same training, a reference cache per node, a node's failure stopping both. Each rank is
tests/ddp_driver.py (the CLI, plus a digest of its LoRA weights and the files it wrote).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist
from helpers import ROOT, cpu_recipe

from dpo_xpu import distributed
from dpo_xpu.errors import DeviceNotAvailableError, RecipeError

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()) or sys.platform == "win32",
    reason="needs torch.distributed with the gloo backend (two CPU processes)",
)

DRIVER = ROOT / "tests" / "ddp_driver.py"
STEPS = 4
LOSS_TOLERANCE = 1e-3


def recipe_values(model: Path, rows: Path, out: Path, **overrides: Any) -> dict[str, Any]:
    """4 steps of batch 1 on 8 rows, small constant lr, no dropout: 2 processes vs 1 process x accumulation 2."""
    values: dict[str, Any] = dict(
        limit=8,
        max_steps=STEPS,
        per_device_train_batch_size=1,
        max_length=320,
        max_prompt_length=192,
        learning_rate=1e-4,
        warmup_steps=0,
        lr_scheduler_type="constant",
        lora_dropout=0.0,
        save_steps=10000,
    )
    values.update(overrides)
    return cpu_recipe(model, rows, out, **values).to_dict()


def write_recipe(path: Path, values: dict[str, Any]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return path


def torchrun(
    recipe: Path, report_dir: Path, *extra: str, env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess, list[dict[str, Any]]]:
    """``dpo-xpu train --recipe RECIPE EXTRA`` on two gloo ranks; the process and both ranks' reports."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [str(DRIVER), str(report_dir), "train", "--recipe", str(recipe), *extra]
    empty_reports(report_dir)
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=driver_env(env), timeout=600)
    return proc, read_reports(report_dir)


def empty_reports(report_dir: Path) -> None:
    report_dir.mkdir(parents=True, exist_ok=True)
    for old in report_dir.glob("rank*.json"):
        old.unlink()


def driver_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The ranks' environment: this checkout, offline, one thread each, plus ``env``."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1",
        "TQDM_DISABLE": "1",
        "OMP_NUM_THREADS": "1",
        **(env or {}),
    }


def read_reports(report_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(report_dir.glob("rank*.json"))]


def two_nodes(
    driver_args: list[list[str]], report_dir: Path, envs: list[dict[str, str]], nproc: int = 1
) -> tuple[list[subprocess.CompletedProcess], list[dict[str, Any]]]:
    """Two ``torchrun`` launchers on this machine as two nodes of ``nproc`` processes (``--nnodes 2 --node-rank
    0/1``, static rendezvous on 127.0.0.1, gloo), each running the driver on its ``driver_args`` with its ``envs``
    (``DPO_XPU_CACHE_DIR``: each node's own disk); both launchers and every rank's report."""
    with socket.socket() as probe:  # a free port for node 0's rendezvous store
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    empty_reports(report_dir)
    procs, logs = [], []
    for node, (args, env) in enumerate(zip(driver_args, envs, strict=True)):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", str(nproc)]
        command += ["--node-rank", str(node), "--rdzv-endpoint", f"127.0.0.1:{port}", str(DRIVER), str(report_dir)]
        out, err = ((report_dir / f"node{node}.{stream}").open("w") for stream in ("out", "err"))
        logs += [out, err]
        procs.append(subprocess.Popen([*command, *args], cwd=ROOT, env=driver_env(env), stdout=out, stderr=err))
    try:
        for proc in procs:
            proc.wait(timeout=600)
    finally:
        for proc in procs:
            if proc.poll() is None:  # a launcher left waiting: the test fails, nothing stays behind
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
    done = []
    for node, proc in enumerate(procs):
        out, err = ((report_dir / f"node{node}.{stream}").read_text() for stream in ("out", "err"))
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done, read_reports(report_dir)


def train_rows(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if "loss" in row]


def writes_inside(report: dict[str, Any], *folders: Path) -> list[str]:
    """The writes of a rank under ``folders``, less ``mkdir(exist_ok=True)`` of folders rank 0's run holds too
    (the run folder, and ``checkpoint-N``, which each rank's Trainer makes for its ``rng_state_<rank>.pth``)."""
    roots = [str(f.resolve()) for f in folders]
    found = []
    for write in report["writes"]:
        event, path = write.split(" ", 1)
        if not any(path.startswith(root) for root in roots):
            continue
        if event == "os.mkdir" and Path(path).is_dir():
            continue
        found.append(write)
    return found


def adapter_weights(adapter_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def single(stories260k_path, orca_rows_path, tmp_path_factory):
    """The reference: one process, batch 1 x accumulation 2, adapter-off and precomputed."""
    from dpo_xpu.pipeline import run_training
    from dpo_xpu.recipes import Recipe

    base = tmp_path_factory.mktemp("single")
    os.environ["DPO_XPU_CACHE_DIR"] = str(base / "cache")
    try:
        out = {}
        for reference in ("adapter-off", "precomputed"):
            values = recipe_values(
                stories260k_path, orca_rows_path, base / reference, gradient_accumulation_steps=2, reference=reference
            )
            out[reference] = run_training(Recipe(**values), live_plot=False)
    finally:
        del os.environ["DPO_XPU_CACHE_DIR"]
    return out


def check_like_single(run_dir: Path, single_run: Any, reports: list[dict[str, Any]]) -> float:
    """The checks both strategies share; returns the largest per-step loss difference."""
    rows = train_rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # every step logged once
    expected = [r for r in single_run.metrics if "loss" in r]
    worst = max(abs(a["loss"] - b["loss"]) for a, b in zip(rows, expected, strict=True))
    assert worst < LOSS_TOLERANCE, (rows, expected)
    assert rows[-1]["loss"] != pytest.approx(rows[0]["loss"], abs=1e-4)  # it trained
    assert len(reports) == 2
    assert reports[0]["lora_sha256"] and reports[0]["lora_sha256"] == reports[1]["lora_sha256"]
    ddp, one = adapter_weights(run_dir / "adapter"), adapter_weights(single_run.adapter_dir)
    assert ddp.keys() == one.keys()
    assert max((ddp[k].float() - one[k].float()).abs().max().item() for k in ddp) < 1e-3
    return worst


@pytest.mark.slow
def test_two_processes_train_as_one_with_accumulation_and_rank0_writes_alone(
    single, stories260k_path, orca_rows_path, tmp_path
):
    run_dir = tmp_path / "ddp"
    recipe = write_recipe(tmp_path / "r.yaml", recipe_values(stories260k_path, orca_rows_path, run_dir))
    proc, reports = torchrun(recipe, tmp_path / "reports")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "global batch 2 = 1 per device x 2 processes x 1 accumulation step" in proc.stderr
    assert proc.stdout.count("run folder:") == 1  # the summary is printed once, by rank 0
    worst = check_like_single(run_dir, single["adapter-off"], reports)
    print(f"largest per-step loss difference, 2 processes vs 1 x accumulation 2: {worst:.2e}")
    # one adapter, one checkpoint with both ranks' RNG states, nothing else
    assert sorted(p.name for p in run_dir.iterdir() if p.is_dir()) == ["adapter", f"checkpoint-{STEPS}"]
    checkpoint = run_dir / f"checkpoint-{STEPS}"
    assert {"COMPLETE", "rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in checkpoint.iterdir()}
    assert not list(tmp_path.glob("ddp.*"))  # no second run folder (ddp.previous, ...)
    rank1 = next(r for r in reports if r["rank"] == 1)
    assert writes_inside(rank1, run_dir) == [], "rank 1 wrote into the run folder"
    rank0 = next(r for r in reports if r["rank"] == 0)
    assert writes_inside(rank0, run_dir / "metrics.jsonl")  # the audit does see rank 0's writes


@pytest.mark.slow
def test_precomputed_reference_is_computed_once_by_rank0(single, stories260k_path, orca_rows_path, tmp_path):
    run_dir, cache = tmp_path / "ddp-pre", tmp_path / "cache"
    values = recipe_values(stories260k_path, orca_rows_path, run_dir, reference="precomputed")
    proc, reports = torchrun(
        write_recipe(tmp_path / "r.yaml", values), tmp_path / "rep", env={"DPO_XPU_CACHE_DIR": str(cache)}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    worst = check_like_single(run_dir, single["precomputed"], reports)
    print(f"precomputed: largest per-step loss difference, 2 processes vs 1 x accumulation 2: {worst:.2e}")
    assert len(list(cache.glob("*.safetensors"))) == 1
    rank1 = next(r for r in reports if r["rank"] == 1)
    assert writes_inside(rank1, run_dir, cache) == [], "rank 1 wrote into the run folder or the cache"
    assert writes_inside(next(r for r in reports if r["rank"] == 0), cache)


def test_each_node_fills_its_cache_once_and_one_ranks_error_stops_every_rank(tmp_path):
    """Two nodes of two processes: each node's first process fills the node's own cache folder, then its second
    reads it; a check failing on rank 3 alone is raised on all four, said with its rank."""
    caches = [tmp_path / "node0-cache", tmp_path / "node1-cache"]
    procs, reports = two_nodes([["probe", str(cache), "3"] for cache in caches], tmp_path / "rep", [{}, {}], nproc=2)
    assert [p.returncode for p in procs] == [0, 0], procs[1].stderr[-3000:]
    assert (caches[0] / "cache.txt").read_text().splitlines() == ["computed 0", "read 1"]
    assert (caches[1] / "cache.txt").read_text().splitlines() == ["computed 2", "read 3"]
    errors = {r["rank"]: (r["error"], r["all_ranks"]) for r in reports}
    assert errors == {3: ("no model here", True), **{r: ("on rank 3: no model here", True) for r in (0, 1, 2)}}


@pytest.mark.slow
def test_two_nodes_train_as_one_process_and_each_node_computes_its_reference_once(
    single, stories260k_path, orca_rows_path, tmp_path
):
    """Two launchers as two nodes of one process each (their own cache folders: no shared file system) train what
    one process with accumulation 2 trains; rank 0 writes the one adapter; each node computes its reference once."""
    run_dir, caches = tmp_path / "two-nodes", [tmp_path / "cache0", tmp_path / "cache1"]
    values = recipe_values(stories260k_path, orca_rows_path, run_dir, reference="precomputed")
    args = ["train", "--recipe", str(write_recipe(tmp_path / "r.yaml", values))]
    procs, reports = two_nodes([args, args], tmp_path / "rep", [{"DPO_XPU_CACHE_DIR": str(c)} for c in caches])
    assert [p.returncode for p in procs] == [0, 0], procs[0].stderr[-3000:] + procs[1].stderr[-3000:]
    assert "global batch 2 = 1 per device x 2 processes x 1 accumulation step" in procs[0].stderr
    worst = check_like_single(run_dir, single["precomputed"], reports)
    print(f"two nodes: largest per-step loss difference vs 1 process x accumulation 2: {worst:.2e}")
    assert sorted(p.name for p in run_dir.iterdir() if p.is_dir()) == ["adapter", f"checkpoint-{STEPS}"]
    for node, (proc, cache) in enumerate(zip(procs, caches, strict=True)):
        assert len(list(cache.glob("*.safetensors"))) == 1, node
        assert proc.stderr.count("reference log-probs for train (8 pairs) computed and cached") == 1, node
    rank0, rank1 = sorted(reports, key=lambda r: r["rank"])
    assert writes_inside(rank1, run_dir, caches[0]) == [], "node 1 wrote into the run folder or node 0's cache"
    assert writes_inside(rank0, caches[1]) == [], "node 0 wrote into node 1's cache"
    assert writes_inside(rank1, caches[1]) and writes_inside(rank0, caches[0])


def test_a_failure_on_node1_stops_both_launchers_with_one_line(stories260k_path, orca_rows_path, tmp_path):
    """Node 1 lacks the model: both launchers stop (no rank left waiting), the error said in one line, once."""
    recipes = []
    for node, model in enumerate((stories260k_path, tmp_path / "absent-model")):
        values = recipe_values(model, orca_rows_path, tmp_path / "run")
        recipes.append(["train", "--recipe", str(write_recipe(tmp_path / f"r{node}.yaml", values))])
    procs, _ = two_nodes(recipes, tmp_path / "rep", [{"DDP_TEST_NO_BARRIER": "1"}] * 2)
    assert all(p.returncode != 0 for p in procs)
    stderr = procs[0].stderr + procs[1].stderr
    assert stderr.count("dpo-xpu: error:") == 1, stderr[-3000:]
    line = next(x for x in stderr.splitlines() if x.startswith("dpo-xpu: error:"))
    assert "absent-model does not exist" in line


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_both_at_one_step_and_resume_finishes_the_run(
    single, stories260k_path, orca_rows_path, tmp_path
):
    run_dir = tmp_path / "ddp-int"
    recipe = write_recipe(tmp_path / "r.yaml", recipe_values(stories260k_path, orca_rows_path, run_dir))
    signal_env = {"DDP_TEST_SIGNAL_STEP": "2", "DDP_TEST_SIGNAL_RANK": "1"}
    proc, reports = torchrun(recipe, tmp_path / "rep1", env=signal_env)
    assert proc.returncode != 0
    assert {r["exit_code"] for r in reports} == {128 + signal.SIGTERM}, proc.stderr[-3000:]
    assert proc.stderr.count("training stopped by SIGTERM at step 2") == 1  # said once, by rank 0
    assert [p.name for p in run_dir.glob("checkpoint-*")] == ["checkpoint-2"]
    assert (run_dir / "checkpoint-2" / "COMPLETE").is_file()
    assert [r["step"] for r in train_rows(run_dir)] == [1, 2]
    proc, reports = torchrun(recipe, tmp_path / "rep2", "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = train_rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    expected = [r for r in single["adapter-off"].metrics if "loss" in r]
    worst = max(abs(a["loss"] - b["loss"]) for a, b in zip(rows, expected, strict=True))
    print(f"interrupted + resumed: largest per-step loss difference vs 1 x accumulation 2: {worst:.2e}")
    assert worst < LOSS_TOLERANCE
    assert reports[0]["lora_sha256"] == reports[1]["lora_sha256"]
    assert writes_inside(next(r for r in reports if r["rank"] == 1), run_dir) == []


def test_an_error_on_rank0_stops_every_rank_with_one_line(stories260k_path, orca_rows_path, tmp_path):
    """A folder that holds a run, without --overwrite: rank 0 refuses, rank 1 raises the same, it is said once."""
    run_dir = tmp_path / "taken"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 0.69}\n')
    (run_dir / "fingerprints.json").write_text("{}\n")  # a dpo_xpu run's (a folder of the user's is refused too)
    recipe = write_recipe(tmp_path / "r.yaml", recipe_values(stories260k_path, orca_rows_path, run_dir))
    proc, reports = torchrun(recipe, tmp_path / "rep")
    assert proc.returncode != 0
    assert [r["exit_code"] for r in reports] == [2, 2]
    assert proc.stderr.count("already holds a run") == 1, proc.stderr[-3000:]
    assert all(r["lora_sha256"] is None for r in reports)


def test_device_for_rank(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.device_for_rank("xpu", None, 2) == "xpu"
    assert distributed.device_for_rank("cuda", "1", 2) == "cuda:1"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.device_for_rank("xpu", None, 2) == "xpu:1"
    assert distributed.device_for_rank("cpu", None, 0) == "cpu"
    with pytest.raises(DeviceNotAvailableError, match="names one device"):
        distributed.device_for_rank("xpu", "0", 2)
    with pytest.raises(DeviceNotAvailableError, match="nproc_per_node 1"):
        distributed.device_for_rank("cuda", None, 1)


def test_sharding_engines_are_refused_with_nf4(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(RecipeError, match="bitsandbytes issue #1945"):
        distributed.check_engine("nf4", {})
    with pytest.raises(RecipeError, match="not tested"):
        distributed.check_engine("none", {})
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    distributed.check_engine("nf4", {})  # DDP: fine
    with pytest.raises(RecipeError, match="DeepSpeed"):
        distributed.check_engine("nf4", {"deepspeed": "ds.json"})


def test_global_batch_line(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    line = distributed.global_batch_line(2, 4)
    assert "global batch 8 = 2 per device x 1 process x 4 accumulation steps" in line


def test_single_process_helpers_run_directly(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.on_rank_zero(lambda x: x + 1, 1) == 2
    assert distributed.main_process_first(lambda: "ok") == "ok"
    assert distributed.on_every_rank(lambda x: x * 2, 2) == 4
    assert distributed.agree_on_signal(None) is None
    assert distributed.agree_on_signal(15) == 15
    assert distributed.ddp_config_kwargs({}) == {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.ddp_config_kwargs({}) == {"ddp_find_unused_parameters": False}
    assert distributed.ddp_config_kwargs({"ddp_find_unused_parameters": True}) == {}


@pytest.mark.slow
def test_launch_training_forks_two_cpu_ranks(stories260k_path, orca_rows_path, tmp_path):
    """The notebook path: dpo_xpu.launch.launch_training on a CPU recipe (accelerate's debug_launcher)."""
    run_dir = tmp_path / "launched"
    values = recipe_values(stories260k_path, orca_rows_path, run_dir, max_steps=2)
    code = f"from dpo_xpu.launch import launch_training\nprint('RUN', launch_training({values!r}, num_processes=2))\n"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"RUN {run_dir}" in proc.stdout
    assert "2 processes (gloo)" in proc.stderr
    assert [r["step"] for r in train_rows(run_dir)] == [1, 2]
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in (run_dir / "checkpoint-2").iterdir()}
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_launch_training_on_one_device_says_so_and_trains_here(monkeypatch, capsys, tmp_path):
    import dpo_xpu.pipeline as pipeline
    from dpo_xpu.launch import launch_training

    calls = []
    monkeypatch.setattr(pipeline, "run_training", lambda recipe, **kwargs: calls.append((recipe.output_dir, kwargs)))
    run_dir = launch_training({"device": "cpu", "output_dir": str(tmp_path / "run")}, num_processes=None)
    assert run_dir == tmp_path / "run"
    assert calls == [(str(tmp_path / "run"), {"overwrite": False, "live_plot": False, "resume": False})]
    assert "one process on the CPU: training in this process" in capsys.readouterr().out
    with pytest.raises(RecipeError, match="num_processes must be at least 1"):
        launch_training({"device": "cpu"}, num_processes=0)
