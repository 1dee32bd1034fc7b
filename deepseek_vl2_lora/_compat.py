"""Import-time workarounds for the environments this repo is installed into."""

import importlib.abc
import importlib.machinery
import logging
import sys

import torch

_keepalive = []


def ensure_torchvision_importable() -> None:
    """timm and transformers import torchvision when it is installed. PyPI's Linux torchvision wheels are CUDA
    builds; next to a CPU-only torch their compiled ops cannot load, and torchvision 0.28 then fails on import
    while registering fake kernels for `nms`/`qnms`. We never use those ops: declare their schemas so the
    pure-Python parts of torchvision import. A torchvision that imports normally is left alone."""
    try:
        import torchvision  # noqa: F401
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        lib = torch.library.Library("torchvision", "FRAGMENT")
        for op in ("nms", "qnms"):
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _keepalive.append(lib)  # a Library unregisters its definitions when garbage-collected
        import torchvision  # noqa: F401
    except ImportError:
        pass  # not installed: timm needs it, and says so itself


class _BitsandbytesWithoutHubKernels(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports `bitsandbytes` with the `kernels` package hidden and its logger quiet, once.

    bitsandbytes 0.50 on a CPU with AVX-512 BF16 asks `kernels` (a transformers dependency) at import for an optional
    4-bit GEMV kernel from the Hugging Face Hub: a network request at every process start (PEFT imports bitsandbytes
    whenever it is installed), refused anyway (an untrusted repository) and logged as a warning. Nothing here uses
    that GEMV (quantized weights are dequantized, model/quant.py) and no remote code is ever run, so bitsandbytes
    takes its own fallback without asking."""

    def find_spec(self, name, path=None, target=None):
        if name != "bitsandbytes":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None:
            self._loader, spec.loader = spec.loader, self
        return spec

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        hidden = sys.modules.get("kernels")
        sys.modules["kernels"] = None  # `from kernels import ...` raises ImportError
        log = logging.getLogger("bitsandbytes.backends.cpu.ops")
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            self._loader.exec_module(module)
        finally:
            log.setLevel(level)
            if hidden is None:
                del sys.modules["kernels"]
            else:
                sys.modules["kernels"] = hidden

    def __getattr__(self, name):  # resource readers etc.: the real loader's (once it is known)
        if "_loader" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["_loader"], name)


def keep_bitsandbytes_off_the_hub() -> None:
    if "bitsandbytes" not in sys.modules and not any(
        isinstance(f, _BitsandbytesWithoutHubKernels) for f in sys.meta_path
    ):
        sys.meta_path.insert(0, _BitsandbytesWithoutHubKernels())
