import os
import shutil
import tempfile

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session", autouse=True)
def _resident_cache_dir():
    """The resident loader's decoded arrays go to a folder of this session, not ~/.cache
    (subprocesses, e.g. torchrun runs, inherit it through the environment)."""
    folder = tempfile.mkdtemp(prefix="fasthpa_resident_")
    old = os.environ.get("FASTHPA_RESIDENT_DIR")
    os.environ["FASTHPA_RESIDENT_DIR"] = folder
    yield folder
    if old is None:
        os.environ.pop("FASTHPA_RESIDENT_DIR", None)
    else:
        os.environ["FASTHPA_RESIDENT_DIR"] = old
    shutil.rmtree(folder, ignore_errors=True)


_FAILED_FILES: set[str] = set()


def pytest_runtest_logreport(report):
    if report.failed:
        _FAILED_FILES.add(report.nodeid.split("::")[0])


@pytest.fixture(scope="module", autouse=True)
def _module_temp_dirs_removed(request, tmp_path_factory):
    """A module's tmp_path_factory folders (trained runs of ~130 MB checkpoints) go when the
    module ends, not when the session does: the suite then peaks at one module's files, not at
    all of them (a full run once filled CI's disk). A module with a failed test keeps its own."""
    base = tmp_path_factory.getbasetemp()
    before = set(os.listdir(base))
    yield
    if request.node.nodeid.split("::")[0] in _FAILED_FILES:
        return
    for name in set(os.listdir(base)) - before:
        shutil.rmtree(base / name, ignore_errors=True)


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def _has_dali() -> bool:
    try:
        import nvidia.dali  # noqa: F401

        return True
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_dali = pytest.mark.skip(reason="needs NVIDIA DALI (pip install 'fasthpa[dali]')")
    cuda, dali = _has_cuda(), _has_dali()
    for item in items:
        if "gpu" in item.keywords and not cuda:
            item.add_marker(skip_gpu)
        if "dali" in item.keywords and not dali:
            item.add_marker(skip_dali)
