"""environment.yml, environment-ipex-llm.yml, requirements/ipex-llm-cpu.txt and pyproject.toml agree on the
versions they share."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def pip_lines(path: Path) -> dict[str, Requirement]:
    env = yaml.safe_load(path.read_text())
    pips = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    reqs = {}
    for line in pips:
        line = line.split("#")[0].strip()
        if not line or line.startswith("-"):
            continue
        req = Requirement(line)
        reqs[req.name.lower()] = req
    return reqs


def pyproject_requirements() -> dict[str, Requirement]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    deps = data["project"]["dependencies"] + data["project"]["optional-dependencies"]["notebooks"]
    return {Requirement(d).name.lower(): Requirement(d) for d in deps}


def cpu_requirements() -> dict[str, Requirement]:
    reqs = {}
    for line in (ROOT / "requirements" / "ipex-llm-cpu.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            reqs[req.name.lower()] = req
    return reqs


def test_native_conda_env_matches_pyproject():
    conda, project = pip_lines(ROOT / "environment.yml"), pyproject_requirements()
    shared = set(conda) & set(project)
    assert {"torch", "transformers", "trl", "peft", "bitsandbytes"} <= shared
    for name in shared:
        assert conda[name].specifier == project[name].specifier, name


def test_native_lower_bounds_known_to_work():
    project = pyproject_requirements()
    assert Version("4.53") in project["transformers"].specifier
    assert Version("4.52") not in project["transformers"].specifier
    assert Version("0.48") in project["bitsandbytes"].specifier
    assert Version("0.47") not in project["bitsandbytes"].specifier


def test_ipex_llm_conda_env_matches_the_cpu_test_env():
    conda, cpu = pip_lines(ROOT / "environment-ipex-llm.yml"), cpu_requirements()
    pinned = {"transformers": "4.45.0", "trl": "0.11.4", "peft": "0.10.0", "accelerate": "0.34.2"}
    for name, version in pinned.items():
        assert Version(version) in conda[name].specifier, name
        assert Version(version) in cpu[name].specifier, name
    for name in set(conda) & set(cpu):
        for version in re.findall(r"==\s*([\w.]+)", str(cpu[name].specifier)):
            assert Version(version) in conda[name].specifier, (name, version)
    assert Version("0.12") not in conda["trl"].specifier  # TRL < 0.12
    assert Version("0.26") <= Version(pinned["accelerate"])  # ipex_llm.transformers.qlora needs >= 0.26


def test_ipex_llm_version_is_the_last_release_everywhere():
    conda = pip_lines(ROOT / "environment-ipex-llm.yml")
    script = (ROOT / "scripts" / "make_ipex_llm_venv.sh").read_text()
    assert Version("2.2.0") in conda["ipex-llm"].specifier
    assert 'IPEX_LLM_VERSION="${IPEX_LLM_VERSION:-2.2.0}"' in script


def test_the_two_stacks_cannot_share_an_environment():
    native, ipex = pyproject_requirements(), pip_lines(ROOT / "environment-ipex-llm.yml")
    with pytest.raises(StopIteration):
        next(v for v in ("4.45.0",) if Version(v) in native["transformers"].specifier)
    assert not any(Version(v) in ipex["transformers"].specifier for v in ("4.53.0", "5.23.0"))
