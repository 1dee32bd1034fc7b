import atexit
import os
import shutil
import tempfile

import pytest
import torch

# Tiny models on a shared 2-core machine: one intra-op thread is several times faster than oversubscribing.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


# Arrow copies that `datasets` makes of Parquet files go to a temporary cache, not the user's HF cache. Set before any
# test module imports `datasets` (it reads the variable at import).
_HF_CACHE = tempfile.mkdtemp(prefix="hf-datasets-tests-")
os.environ.setdefault("HF_DATASETS_CACHE", _HF_CACHE)
atexit.register(shutil.rmtree, _HF_CACHE, ignore_errors=True)
