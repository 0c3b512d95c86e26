"""setup_oneapi.sh, sourced in bash (and zsh where installed) against a fake oneAPI tree."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "setup_oneapi.sh"
SHELLS = [
    "bash",
    pytest.param("zsh", marks=pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")),
]
FAMILY_VARS = {
    "arc": {"USE_XETLA": "OFF", "SYCL_PI_LEVEL_ZERO_USE_IMMEDIATE_COMMANDLISTS": "1"},
    "flex": {"USE_XETLA": "OFF", "SYCL_PI_LEVEL_ZERO_USE_IMMEDIATE_COMMANDLISTS": "1"},
    "max": {"ENABLE_SDP_FUSION": "1", "SYCL_PI_LEVEL_ZERO_USE_IMMEDIATE_COMMANDLISTS": "1"},
    "igpu": {"BIGDL_LLM_XMX_DISABLED": "1"},
}
ALL_VARS = (
    "USE_XETLA",
    "SYCL_PI_LEVEL_ZERO_USE_IMMEDIATE_COMMANDLISTS",
    "ENABLE_SDP_FUSION",
    "BIGDL_LLM_XMX_DISABLED",
)


@pytest.fixture
def oneapi(tmp_path: Path) -> Path:
    """A fake oneAPI root whose setvars.sh appends a line to ``count`` each time it is sourced."""
    root = tmp_path / "oneapi"
    root.mkdir()
    (root / "setvars.sh").write_text(f'echo sourced >> "{tmp_path / "count"}"\nexport FAKE_ONEAPI_LOADED=1\n')
    return root


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DPO_XPU_", "SETVARS", "ONEAPI"))}
    for name in (*ALL_VARS, "SYCL_CACHE_PERSISTENT", "LD_PRELOAD", "CONDA_PREFIX"):
        env.pop(name, None)
    env["DPO_XPU_ONEAPI_DEFAULT"] = str(tmp_path / "no-default-oneapi")
    env.update(extra)
    return env


def _run(shell: str, script: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([shell, "-c", script], capture_output=True, text=True, env=env, timeout=60)


def _vars(stdout: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in stdout.splitlines() if line.startswith("VAR "))


def _print_vars() -> str:
    names = (*ALL_VARS, "SYCL_CACHE_PERSISTENT", "FAKE_ONEAPI_LOADED", "DPO_XPU_ONEAPI_SOURCED")
    return "; ".join(f'[ -n "${{{n}+x}}" ] && printf "VAR {n}=%s\\n" "${n}"' for n in names) + "; true"


@pytest.mark.parametrize("shell", SHELLS)
def test_sourced_twice_sources_setvars_once(shell: str, oneapi: Path, tmp_path: Path) -> None:
    env = _env(tmp_path, ONEAPI_ROOT=str(oneapi))
    res = _run(shell, f'source "{SCRIPT}"; echo "rc=$?"; source "{SCRIPT}"; echo "rc=$?"; {_print_vars()}', env)
    assert res.stdout.count("rc=0") == 2, res.stdout + res.stderr
    assert (tmp_path / "count").read_text().splitlines() == ["sourced"]
    assert "already set up" in res.stdout
    got = _vars(res.stdout)
    assert got["VAR FAKE_ONEAPI_LOADED"] == "1"
    assert got["VAR DPO_XPU_ONEAPI_SOURCED"] == str(oneapi)


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("family", ["arc", "flex", "max", "igpu"])
def test_family_variables(shell: str, family: str, oneapi: Path, tmp_path: Path) -> None:
    env = _env(tmp_path, ONEAPI_ROOT=str(oneapi))
    res = _run(shell, f'source "{SCRIPT}" {family} || echo FAILED; {_print_vars()}', env)
    assert "FAILED" not in res.stdout, res.stderr
    got = {k.removeprefix("VAR "): v for k, v in _vars(res.stdout).items()}
    assert got["SYCL_CACHE_PERSISTENT"] == "1"
    for name, value in FAMILY_VARS[family].items():
        assert got.get(name) == value, (name, res.stdout)
        assert f"export {name}={value}" in res.stdout  # it says what it set
    for name in set(ALL_VARS) - set(FAMILY_VARS[family]) - {"SYCL_PI_LEVEL_ZERO_USE_IMMEDIATE_COMMANDLISTS"}:
        assert name not in got, f"{name} must not be set for {family}"


def test_default_family_is_arc(oneapi: Path, tmp_path: Path) -> None:
    res = _run("bash", f'source "{SCRIPT}"; {_print_vars()}', _env(tmp_path, ONEAPI_ROOT=str(oneapi)))
    assert _vars(res.stdout).get("VAR USE_XETLA") == "OFF"
    assert "GPU family arc" in res.stdout


def test_switching_family_drops_the_old_family_variables(oneapi: Path, tmp_path: Path) -> None:
    script = f'source "{SCRIPT}" arc; source "{SCRIPT}" max; {_print_vars()}'
    got = _vars(_run("bash", script, _env(tmp_path, ONEAPI_ROOT=str(oneapi))).stdout)
    assert got.get("VAR ENABLE_SDP_FUSION") == "1"
    assert "VAR USE_XETLA" not in got


def test_max_preloads_tcmalloc_when_found(oneapi: Path, tmp_path: Path) -> None:
    conda = tmp_path / "conda"
    (conda / "lib").mkdir(parents=True)
    (conda / "lib" / "libtcmalloc.so").write_bytes(b"")
    env = _env(tmp_path, ONEAPI_ROOT=str(oneapi), CONDA_PREFIX=str(conda))
    # Sourced twice: the library is added to LD_PRELOAD once. printf is a builtin, so nothing preloads it.
    res = _run("bash", f'source "{SCRIPT}" max; source "{SCRIPT}" max; printf "PRELOAD=%s\\n" "$LD_PRELOAD"', env)
    assert f"PRELOAD={conda}/lib/libtcmalloc.so\n" in res.stdout


def test_max_without_tcmalloc_says_so_and_succeeds(oneapi: Path, tmp_path: Path) -> None:
    env = _env(tmp_path, ONEAPI_ROOT=str(oneapi), CONDA_PREFIX=str(tmp_path / "no-conda"))
    res = _run("bash", f'source "{SCRIPT}" max; echo "rc=$?"', env)
    assert "rc=0" in res.stdout
    if not any(Path("/usr/lib/x86_64-linux-gnu", n).exists() for n in ("libtcmalloc.so", "libtcmalloc.so.4")):
        assert "libtcmalloc not found" in res.stdout


@pytest.mark.parametrize("shell", SHELLS)
def test_run_as_program_says_to_source_it(shell: str, oneapi: Path, tmp_path: Path) -> None:
    res = subprocess.run(
        [shell, str(SCRIPT)], capture_output=True, text=True, env=_env(tmp_path, ONEAPI_ROOT=str(oneapi))
    )
    assert res.returncode != 0
    assert "must be sourced" in res.stderr and "source setup_oneapi.sh" in res.stderr
    assert not (tmp_path / "count").exists()


@pytest.mark.parametrize("shell", SHELLS)
def test_no_oneapi_explains_and_shell_survives(shell: str, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    env = _env(tmp_path, ONEAPI_ROOT=str(empty))
    res = _run(shell, f'source "{SCRIPT}"; echo "rc=$?"; echo still-alive', env)
    assert "rc=1" in res.stdout and "still-alive" in res.stdout
    assert res.returncode == 0
    assert "no Intel oneAPI found" in res.stderr
    assert "oneAPI Base Toolkit" in res.stderr and "native backend" in res.stderr


@pytest.mark.parametrize("shell", SHELLS)
def test_unknown_family_returns_1(shell: str, oneapi: Path, tmp_path: Path) -> None:
    res = _run(shell, f'source "{SCRIPT}" a770; echo "rc=$?"', _env(tmp_path, ONEAPI_ROOT=str(oneapi)))
    assert "rc=1" in res.stdout
    assert "unknown GPU family 'a770'" in res.stderr and "arc, flex, max, igpu" in res.stderr
    assert not (tmp_path / "count").exists()


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help(shell: str, flag: str, tmp_path: Path) -> None:
    res = _run(shell, f'source "{SCRIPT}" {flag}; echo "rc=$?"', _env(tmp_path))
    assert res.stdout.startswith("Usage: source setup_oneapi.sh")
    assert "rc=0" in res.stdout and "igpu" in res.stdout
    ran = subprocess.run(["bash", str(SCRIPT), flag], capture_output=True, text=True, env=_env(tmp_path))
    assert ran.returncode == 0 and ran.stdout.startswith("Usage:")


@pytest.mark.parametrize("shell", SHELLS)
def test_leaves_no_helpers_or_shell_options_behind(shell: str, oneapi: Path, tmp_path: Path) -> None:
    check = "typeset -f _dpo_xpu_oneapi_setup >/dev/null && echo LEAKED-FUNCTION; "
    check += '[ -n "${_dpo_xpu_oneapi_status+x}" ] && echo LEAKED-VARIABLE; '
    check += "false; echo survived-false"  # no `set -e` leaked into the shell
    res = _run(shell, f'source "{SCRIPT}"; {check}', _env(tmp_path, ONEAPI_ROOT=str(oneapi)))
    assert "survived-false" in res.stdout
    assert "LEAKED" not in res.stdout
