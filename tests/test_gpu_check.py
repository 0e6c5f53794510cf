"""scripts/gpu_check.sh on a simulated bare GPU machine, and its --prepare download.

The GPU machine lacks DALI, iterative-stratification and lz4. Here a ``sitecustomize`` meta-path
blocker (first on PYTHONPATH) makes them unimportable except from folders under the test's
TMPDIR, where gpu_check.sh unpacks the carried wheels; the carry folder holds wheels built from
the copies installed here (the real ones, for CPython 3.12, come from ``--prepare``, which needs
the package registry). The dry run must then pass: every step's imports resolve, the GPU tests
collect, the benchmarks take the flags the check passes, and the budget plan fits."""

from __future__ import annotations

import importlib.metadata
import os
import re
import socket
import subprocess
import sys
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_check.sh"
BLOCKED = ("nvidia.dali", "iterstrat", "lz4")
PLAN_STEPS = ("env", "carry", "import", "pytest", "throughput", "losses", "thresholds", "loader")

BLOCKER = f'''
"""Written by tests/test_gpu_check.py: a bare GPU machine. {BLOCKED} import only from folders
under FASTHPA_TEST_CARRY_ROOT (where gpu_check.sh unpacks the carried wheels)."""
import importlib.abc
import importlib.machinery
import os
import sys

_BLOCKED = {BLOCKED!r}
_ROOT = os.environ.get("FASTHPA_TEST_CARRY_ROOT") or "/nonexistent"


class _BareDevice(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name not in _BLOCKED:
            return None  # other modules, and submodules of a carried package: the usual finders
        entries = [p for p in (path or sys.path) if os.path.abspath(p or ".").startswith(_ROOT)]
        spec = importlib.machinery.PathFinder.find_spec(name, entries)
        if spec is None:
            raise ModuleNotFoundError(f"No module named {{name!r}} (the bare device lacks it)")
        return spec


sys.meta_path.insert(0, _BareDevice())
'''


def _fake_wheel(carry: Path, dist: str, package: str, python_tag: str) -> Path:
    """A wheel of the installed ``package`` (its files and dist-info), as pip would build it."""
    d = importlib.metadata.distribution(dist)
    root = Path(d.locate_file(""))
    name = f"{d.metadata['Name'].replace('-', '_')}-{d.version}-{python_tag}-none-any.whl"
    with zipfile.ZipFile(carry / name, "w") as z:
        for f in d.files or []:
            if f.parts[0] == package or f.parts[0].endswith(".dist-info"):
                if (root / f).is_file() and "__pycache__" not in f.parts:
                    z.write(root / f, str(f))
        z.writestr("tests/__init__.py", "")  # as iterative-stratification's own wheel ships
    return carry / name


@pytest.fixture
def bare_device(tmp_path):
    """(environment of the bare device, carry folder, TMPDIR) with the blocker in place."""
    bare, carry, tmp = tmp_path / "bare", tmp_path / "carry", tmp_path / "tmp"
    for d in (bare, carry, tmp):
        d.mkdir()
    (bare / "sitecustomize.py").write_text(BLOCKER)
    _fake_wheel(carry, "iterative-stratification", "iterstrat", "py3")
    try:  # lz4 is carried for the GPU machine; here only if this environment has it
        importlib.metadata.distribution("lz4")
        tag = f"cp{sys.version_info[0]}{sys.version_info[1]}"
        _fake_wheel(carry, "lz4", "lz4", tag)
    except importlib.metadata.PackageNotFoundError:
        pass
    env = os.environ | {
        "PYTHON": sys.executable,
        "PYTHONPATH": str(bare),
        "FASTHPA_TEST_CARRY_ROOT": str(tmp),
        "TMPDIR": str(tmp),
    }
    return env, carry, tmp


def test_the_blocker_makes_the_missing_packages_unimportable(bare_device):
    """The simulation holds: without the carry, the split the GPU tests run fails as it would
    on the device, and DALI is absent."""
    env, _, _ = bare_device
    probe = (
        "import importlib, sys\n"
        f"for name in {BLOCKED!r}:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "        sys.exit(f'{name} imported')\n"
        "    except ModuleNotFoundError as e:\n"
        "        assert 'bare device lacks it' in str(e), e\n"
        "import numpy as np\n"
        "from fasthpa.data.splits import stratified_split\n"
        "try:\n"
        "    stratified_split(np.eye(8, 28, dtype=np.uint8), (0.5, 0.5, 0.0))\n"
        "    sys.exit('split without iterstrat')\n"
        "except ModuleNotFoundError:\n"
        "    print('blocked')\n"
    )
    p = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env)
    assert p.returncode == 0 and p.stdout.strip() == "blocked", p.stdout + p.stderr


def test_dry_run_on_a_bare_device_resolves_every_import_and_fits_the_budget(bare_device, tmp_path):
    env, carry, tmp = bare_device
    out = tmp_path / "check"
    cmd = ["bash", str(SCRIPT), str(out), "--dry-run", "--skip", "throughput-cpu", "--carry"]
    proc = subprocess.run(
        [*cmd, str(carry)], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    for step in (*PLAN_STEPS, "plan"):
        assert f"| {step} | ok |" in summary, summary
    assert "| throughput-cpu | skipped (--skip) |" in summary

    # the shim alone (installed copies hidden) maps fasthpa.kernels to this checkout; the carried
    # iterstrat comes from the unpacked wheel under TMPDIR and the split runs on it; DALI absent
    imports = (out / "import.log").read_text()
    assert f"fasthpa.kernels -> {REPO / 'kernels' / '__init__.py'}" in imports
    assert re.search(rf"carried: iterstrat -> {re.escape(str(tmp))}/\S+/site/iterstrat/", imports)
    assert "optional, absent: nvidia.dali" in imports and "stratified_split (iterstrat)" in imports
    assert "imported" in imports and imports.rstrip().endswith("ok")
    assert "DALI absent" in (out / "env.txt").read_text()
    assert "unpacked iterative_stratification-" in (out / "carry.log").read_text()

    # every GPU test collects, the torchrun + DDP + compile run among them
    collected = (out / "pytest_gpu.log").read_text()
    assert re.search(r"\d+/\d+ tests collected", collected), collected[-2000:]
    assert "test_train_gpu.py::test_short_amp_compiled_run_on_cuda" in collected
    assert "test_train_gpu.py::test_torchrun_one_process_goes_through_ddp" in collected

    # the plan: every step's limit, summing (with the summary's share) within the budget
    plan = (out / "plan.txt").read_text()
    limits = dict((k, int(v)) for k, v in re.findall(r"(\w+) (\d+)(?= \+| =)", plan))
    total, budget = map(int, re.search(r"= (\d+) s of the (\d+) s budget: fits", plan).groups())
    assert set(PLAN_STEPS) | {"summary"} == set(limits), plan
    assert sum(limits.values()) == total <= budget == 480
    assert proc.stdout.strip().splitlines()[-2] == plan.strip()
    assert proc.stdout.strip().splitlines()[-1].startswith("total ")
    # the temporary shim and site folders are gone: nothing but logs and results is left behind
    assert not list(tmp.glob("fasthpa_gpu_check.*")) and not list(out.glob("sitecustomize*"))


def _registry_reachable() -> bool:
    url = os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple"
    host = urlparse(url).hostname or "pypi.org"
    try:
        socket.create_connection((host, 443), timeout=3).close()
        return True
    except OSError:
        return False


def test_prepare_downloads_the_wheels_for_the_gpu_machine(tmp_path):
    if not _registry_reachable():
        pytest.skip("--prepare downloads from the package registry, which is unreachable here")
    carry = tmp_path / "carry"
    env = os.environ | {"PYTHON": sys.executable}
    cmd = ["bash", str(SCRIPT), "--prepare", str(carry)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    wheels = sorted(p.name for p in carry.glob("*.whl"))
    assert len(wheels) == 2, wheels
    assert re.fullmatch(r"iterative_stratification-[\d.]+-py3-none-any\.whl", wheels[0])
    assert re.fullmatch(r"lz4-[\d.]+-cp312-cp312-.*manylinux.*x86_64\.whl", wheels[1])
    assert sum(p.stat().st_size for p in carry.glob("*.whl")) < 32 * 2**20
    with zipfile.ZipFile(carry / wheels[1]) as z:
        names = z.namelist()
    assert "lz4/frame/_frame.cpython-312-x86_64-linux-gnu.so" in names, names
