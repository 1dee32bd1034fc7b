import atexit
import os
import shutil
import tempfile

import pytest
import torch

# The data validation cache (deepseek_vl2_lora/data/validation_cache.py) of this test session: never the user's.
os.environ["DEEPSEEK_VL2_LORA_DATA_CACHE"] = tempfile.mkdtemp(prefix="dvl2-data-cache-")
atexit.register(shutil.rmtree, os.environ["DEEPSEEK_VL2_LORA_DATA_CACHE"], ignore_errors=True)

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
