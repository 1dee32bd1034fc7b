"""A disk cache of frozen-vision features: projector outputs per image tile, reused on later epochs.

With the vision tower and projector frozen, a tile's features are a pure function of (its pixels, those
weights). So the key of a tile is a hash of its preprocessed pixels (computed in the data loader, off the
training path; changing the preprocessing changes the pixels and so the key), and the cache directory is named
by a fingerprint of the vision + projector weights, their config and dtype (a different checkpoint, or a trained
projector, never reads old entries).

Layout: `<root>/<fingerprint>/<key[:2]>/<key>.safetensors`, each holding one `[tokens_per_tile, D]` tensor;
files are written to a temporary name and renamed, so a killed run never leaves a partial entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..model.checkpoint import save_safetensors


def fingerprint(model) -> str:
    """Hash of everything the cached features depend on besides the pixels."""
    h = hashlib.sha256()
    cfg = model.config
    h.update(json.dumps([repr(cfg.vision), repr(cfg.projector), str(model.dtype)]).encode())
    for module in (model.vision, model.projector):
        for name, t in sorted(module.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:24]


class VisionFeatureCache:
    def __init__(self, root: str | Path, model):
        self.dir = Path(root) / fingerprint(model)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.hits = self.misses = 0

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.safetensors"

    def encode(self, tiles: torch.Tensor, keys: list[str], compute) -> torch.Tensor:
        """Features for `tiles` [T, 3, H, W]: cached ones read, the rest computed by `compute` in one batch and
        stored."""
        if len(keys) != tiles.shape[0]:
            raise ValueError(f"{len(keys)} tile keys for {tiles.shape[0]} tiles")
        found = {}
        for i, key in enumerate(keys):
            path = self._path(key)
            if path.exists():
                found[i] = load_file(path)["features"]
        missing = [i for i in range(len(keys)) if i not in found]
        self.hits += len(found)
        self.misses += len(missing)
        if missing:
            fresh = compute(tiles[missing])
            for j, i in enumerate(missing):
                found[i] = fresh[j]
                self._store(keys[i], fresh[j])
        device = tiles.device
        return torch.stack([found[i].to(device) for i in range(len(keys))])

    def _store(self, key: str, features: torch.Tensor) -> None:
        path = self._path(key)
        path.parent.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        save_safetensors({"features": features.detach().to("cpu").contiguous()}, tmp)
        os.replace(tmp, path)

    def stats(self) -> dict:
        return {"vision_cache/hits": self.hits, "vision_cache/misses": self.misses, "vision_cache/dir": str(self.dir)}
