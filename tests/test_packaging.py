"""Packaging: kernels/ installs as fasthpa.kernels (editable and wheel), never as `kernels`; the
console script and every subcommand's --help work."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_editable_install_maps_kernels_folder():
    import fasthpa.kernels

    assert Path(fasthpa.kernels.__file__).resolve() == REPO / "kernels" / "__init__.py"
    # nothing named `kernels` is importable from outside the checkout
    p = subprocess.run(
        [sys.executable, "-c", "import importlib.util; print(importlib.util.find_spec('kernels'))"],
        capture_output=True,
        text=True,
        cwd="/",
        timeout=60,
    )
    assert p.stdout.strip() == "None", p.stdout + p.stderr
    assert importlib.util.find_spec("fasthpa.kernels.reference") is not None


@pytest.mark.slow
def test_built_wheel_holds_fasthpa_kernels_and_imports(tmp_path):
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("fasthpa-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "fasthpa/kernels/__init__.py" in names and "fasthpa/kernels/reference.py" in names
    assert not any(n.startswith("kernels/") for n in names)
    for module in (
        "data/loader.py",
        "train/loop.py",
        "cv/folds.py",
        "thresholds/search.py",
        "predict/submit.py",
    ):
        assert f"fasthpa/{module}" in names, module
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "import fasthpa.kernels, fasthpa.data.loader, sys; "
        "print(fasthpa.kernels.__file__); import importlib.util as u; print(u.find_spec('kernels'))"
    )
    # -I: isolated mode, so neither the checkout nor the editable install is on the path
    p = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(site)!r}); {code}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    first, second = p.stdout.split()
    assert first.startswith(str(site)) and second == "None"


def test_console_script_lists_every_subcommand():
    exe = Path(sys.executable).parent / "fasthpa"
    p = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0
    for name in ("synth", "check", "pack", "train", "thresholds", "predict", "report", "weights"):
        assert name in p.stdout
        sub = subprocess.run(
            [str(exe), name, "--help"], capture_output=True, text=True, timeout=120
        )
        assert sub.returncode == 0 and "usage: fasthpa " + name in sub.stdout, sub.stderr
        assert "not available yet" not in sub.stdout
