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


@pytest.fixture(scope="session")
def proc_dir(tmp_path_factory):
    """Processor files for data tests: the tiny tokenizer, 32-pixel tiles of 4-pixel patches (41 tokens per image)."""
    from helpers import write_processor_files

    return write_processor_files(tmp_path_factory.mktemp("ckpt_data"), image_size=32, patch_size=4)


@pytest.fixture(scope="session")
def proc(proc_dir):
    from deepseek_vl2_lora.data.processor import DeepseekVL2Processor

    return DeepseekVL2Processor.from_pretrained(proc_dir)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


# Arrow copies that `datasets` makes of Parquet files go to a temporary cache, not the user's HF cache. Set before any
# test module imports `datasets` (it reads the variable at import).
_HF_CACHE = tempfile.mkdtemp(prefix="hf-datasets-tests-")
os.environ.setdefault("HF_DATASETS_CACHE", _HF_CACHE)
atexit.register(shutil.rmtree, _HF_CACHE, ignore_errors=True)
