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
