"""Fine-tuning DeepSeek-VL2: a faithful model, freezing policies, LoRA and a plain training loop.

The subpackages, each importing only those before it (tests/test_layout.py checks it):

    model       the model, its parts, official-layout checkpoint I/O, random tiny checkpoints
    policy      the freezing policy: groups, PEFT adapters, trained state, merge
    data        sources, record layouts, images, the processor (tiling, template, labels), collation, packing
    evaluation  eval-split loss and exact match, VLMEvalKit benchmarks
    training    the loop, its setup, engines (one process, DeepSpeed), checkpoints, metrics, preflight
    plan        the dry-run memory plan (`trainer.dry_run=true`)
    compare     tables and plots across runs

Entry points: train.py, `python -m deepseek_vl2_lora.eval|data|manifest`, scripts/*.py.
"""

import importlib
from pathlib import Path

from ._compat import ensure_torchvision_importable, keep_bitsandbytes_off_the_hub

ensure_torchvision_importable()
keep_bitsandbytes_off_the_hub()

__version__ = "0.1.0"

PACKAGE_DIR = Path(__file__).resolve().parent  # configs/ (Hydra), assets/ (released configs, tokenizer corpus)
CONFIG_DIR = PACKAGE_DIR / "configs"  # the Hydra config tree, shipped in the wheel
REPO_ROOT = PACKAGE_DIR.parent  # data/: relative paths in configs are tried against it too


def lazy_exports(package: str, exports: dict[str, str]):
    """A module `__getattr__` for a subpackage's public names: `from deepseek_vl2_lora.model import X` imports the
    submodule that defines X on first use, so importing a light submodule (a config) never loads torch-heavy ones."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)

    return __getattr__
