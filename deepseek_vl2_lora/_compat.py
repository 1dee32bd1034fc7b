"""Import-time workarounds for the environments this repo is installed into."""

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
