"""The frozen-vision feature cache: same features and same training as without it; invalidated by new weights
or new preprocessing."""

import json
import subprocess
import sys
from pathlib import Path

import torch
from helpers import build_model, make_batch

from deepseek_vl2_lora.data.tiling import tile_key
from deepseek_vl2_lora.training.feature_cache import VisionFeatureCache

ROOT = Path(__file__).resolve().parents[1]


def _frozen(model):
    for p in list(model.vision.parameters()) + list(model.projector.parameters()):
        p.requires_grad_(False)
    return model.eval()


def _keys(batch):
    return [[tile_key(t) for t in batch["images"][b]] for b in range(batch["images"].shape[0])]


def test_cached_features_equal_uncached_and_hit_on_reuse(tmp_path):
    model = _frozen(build_model("small-mla"))
    batch = make_batch(model.config)
    with torch.no_grad():
        plain = model(**batch).logits
        model.feature_cache = VisionFeatureCache(tmp_path, model)
        first = model(**batch, tile_keys=_keys(batch)).logits
        second = model(**batch, tile_keys=_keys(batch)).logits
    assert torch.equal(first, plain) and torch.equal(second, plain)
    cache = model.feature_cache
    assert (cache.misses, cache.hits) == (6, 6)  # sample 0: 3 + 3 tiles; sample 1 has no image
    assert len(list(cache.dir.glob("*/*.safetensors"))) == 6


def test_new_weights_or_new_pixels_miss(tmp_path):
    model = _frozen(build_model("small-mla"))
    batch = make_batch(model.config)
    first = VisionFeatureCache(tmp_path, model)
    with torch.no_grad():
        model.projector.layers[0].bias.add_(0.1)
    second = VisionFeatureCache(tmp_path, model)
    assert first.dir != second.dir  # different weights: a different directory
    shifted = batch["images"][0, 0] + 1e-3  # e.g. another normalisation
    assert tile_key(shifted) != tile_key(batch["images"][0, 0])


def test_trainable_projector_bypasses_the_cache(tmp_path):
    model = _frozen(build_model("small-mla"))
    model.feature_cache = VisionFeatureCache(tmp_path, model)
    model.projector.layers[0].weight.requires_grad_(True)
    batch = make_batch(model.config)
    model(**batch, tile_keys=_keys(batch))
    assert model.feature_cache.hits == model.feature_cache.misses == 0


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


def test_training_with_the_cache_gives_the_same_losses(tmp_path):
    common = [
        "experiment=smoke",
        "trainer.max_steps=12",
        "data.eval_path=null",
        "trainer.progress_bar=false",
        "data.train_limit=16",
        "trainer.micro_batch_size=4",
    ]  # 4 batches an epoch: 3 epochs reuse the cache
    runs = {}
    for name, extra in (("plain", []), ("cached", [f"trainer.vision_feature_cache={tmp_path / 'cache'}"])):
        run = tmp_path / name
        cmd = [sys.executable, "train.py", f"hydra.run.dir={run}", *common, *extra]
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=300)
        runs[name] = _losses(run)
    assert len(runs["plain"]) == 12
    assert runs["cached"] == runs["plain"]
    events = [json.loads(line) for line in (tmp_path / "cached" / "metrics.jsonl").read_text().splitlines()]
    stats = next(e for e in events if e.get("event") == "vision_cache")
    assert stats["vision_cache/misses"] == 16 * 2 and stats["vision_cache/hits"] == 16 * 2 * 2
