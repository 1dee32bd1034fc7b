"""Acceptance: checkpoints in the official layout (sparse config.json, official key names, per-expert weights)
load with `from_pretrained` and reproduce the official fp32 logits.

The yardstick is `tests/official_ref`, an independent plain-PyTorch re-statement of the official forward
(absorbed eager MLA, per-expert loop, de-interleaved RoPE, Llama MHA, masked_scatter layout), written from the
reference facts without importing this package.
"""

import pytest
import torch
from official_ref.batch import make_official_batch
from official_ref.checkpoint import write_official_checkpoint
from official_ref.forward import official_forward

from deepseek_vl2_lora.model import DeepseekVL2ForCausalLM

CASES = [
    ("tiny", False, "eager"),
    ("small", True, "eager"),
    ("full", False, "eager"),
    ("tiny", False, "sdpa"),
    ("small", False, "sdpa"),
    ("full", True, "sdpa"),
]


@pytest.fixture(scope="module")
def official_dirs(tmp_path_factory):
    dirs = {}
    for family in ("tiny", "small", "full"):
        for sharded in (False, True):
            d = tmp_path_factory.mktemp(f"official-{family}-{'sharded' if sharded else 'single'}")
            dirs[family, sharded] = (d, write_official_checkpoint(str(d), family, seed=0, sharded=sharded))
    return dirs


def _relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("family,sharded,attn", CASES)
def test_logits_match_official(official_dirs, family, sharded, attn):
    path, dense = official_dirs[family, sharded]
    batch = make_official_batch(dense, seed=0)
    ref = official_forward(str(path), batch)
    model = DeepseekVL2ForCausalLM.from_pretrained(path, torch_dtype=torch.float32, attn_implementation=attn).eval()
    with torch.no_grad():
        out = model(**batch)
    real = batch["attention_mask"].bool()
    err = _relative_error(out.logits[real], ref["logits"][real])
    assert err <= 1e-4, f"{family}: relative error {err:.2e}"
    assert out.loss.item() == pytest.approx(ref["loss"].item(), rel=1e-4)


@pytest.mark.parametrize("family", ["small", "full"])
def test_training_mode_forward_is_the_same_function(official_dirs, family):
    """The official MoE has separate train/eval paths (and noaux_tc asserts in training); ours has one."""
    path, dense = official_dirs[family, False]
    batch = make_official_batch(dense, seed=1)
    ref = official_forward(str(path), batch)
    model = DeepseekVL2ForCausalLM.from_pretrained(path).train()
    out = model(**batch)
    real = batch["attention_mask"].bool()
    assert _relative_error(out.logits.detach()[real], ref["logits"][real]) <= 1e-4
    (out.loss + out.aux_loss).backward()  # trains, including noaux_tc
    assert model.language.model.layers[1].mlp.gate.weight.grad.abs().sum() > 0


def test_save_pretrained_writes_back_what_it_read(official_dirs, tmp_path):
    """Same keys, shapes and values, and the same sparse config.json."""
    import json

    from safetensors.torch import load_file

    path, _ = official_dirs["full", False]
    DeepseekVL2ForCausalLM.from_pretrained(path).save_pretrained(tmp_path / "out")
    a, b = load_file(path / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == json.loads((path / "config.json").read_text())
