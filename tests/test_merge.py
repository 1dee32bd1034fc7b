"""The streaming merge (one base shard at a time) against the whole-model merge, bit for bit; Hub-sized shards and
their index; the merged checkpoint in the official-code reference. Full-size VL2-Tiny with a peak-RSS bound: slow."""

import json
import math
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from helpers import build_model, make_batch, perturb_trainable
from official_ref.forward import load_official_state_dict
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from deepseek_vl2_lora.cli import merge as cli_merge
from deepseek_vl2_lora.model import DeepseekVL2ForCausalLM
from deepseek_vl2_lora.model.checkpoint import official_shapes, to_official
from deepseek_vl2_lora.model.shards import INDEX_FILE, parse_shard_size
from deepseek_vl2_lora.policy.adapters import load_trained_state, save_trained_state
from deepseek_vl2_lora.policy.groups import apply_policy
from deepseek_vl2_lora.policy.lora import merge_lora
from deepseek_vl2_lora.policy.merge import merge_checkpoint

ROOT = Path(__file__).resolve().parents[1]
LORA = {"mode": "lora", "r": 4, "alpha": 8}
CASES = {  # family -> the trained groups: every kind of merge (Linear LoRA, DoRA, stacked experts, trained in full)
    "tiny-mha": {"mha_qkv": LORA, "routed_experts": {**LORA, "r": 2}, "router": {"mode": "train"}},
    "small-mla": {
        "o_proj": {**LORA, "dora": True},
        "mlp_dense": {**LORA, "dora": True, "layers": [0]},
        "kv_low_rank": {"mode": "train"},
        "view_tokens": {"mode": "train"},
    },
    "full-noaux": {
        "o_proj": {**LORA, "rslora": True},
        "shared_experts": {**LORA, "rslora": True},
        "routed_experts": {**LORA, "rslora": True},
        "q_low_rank": {"mode": "train"},
        "lm_head": {"mode": "train"},
    },
}


def _trained(tmp_path: Path, family: str, base_shard: int = 300_000) -> tuple[Path, Path, DeepseekVL2ForCausalLM]:
    """A bf16 base in several shards and a trained dir whose every trained tensor moved off its start."""
    build_model(family).to(torch.bfloat16).save_pretrained(tmp_path / "base", max_shard_size=base_shard)
    model = DeepseekVL2ForCausalLM.from_pretrained(tmp_path / "base")
    apply_policy(model, {"name": "x", "groups": CASES[family]})
    perturb_trainable(model)
    save_trained_state(model, tmp_path / "trained", base_model=tmp_path / "base")
    return tmp_path / "base", tmp_path / "trained", model.eval()


def _whole_model_merge(base: Path, trained: Path, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """The merge as it was: the whole model in fp32, PEFT's merge, cast to the base dtype."""
    model = DeepseekVL2ForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    load_trained_state(model, trained)
    merge_lora(model).to(dtype)
    return {k: v.contiguous() for k, v in to_official(model.state_dict()).items()}


def _files(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _check_index(path: Path, limit: int) -> dict:
    """Every shard's tensors within `limit` bytes, and the index exactly what the files hold."""
    index = json.loads((path / INDEX_FILE).read_text())
    files = sorted(f.name for f in path.glob("*.safetensors"))
    n = len(files)
    assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)] and n > 1
    total = 0
    for name in files:
        with safe_open(str(path / name), framework="pt") as fh:
            keys = list(fh.keys())
            size = sum(math.prod(fh.get_slice(k).get_shape()) * 2 for k in keys)  # bf16
        assert size <= limit or len(keys) == 1, (name, size)  # (one tensor over the limit gets a file alone)
        assert all(index["weight_map"][k] == name for k in keys)
        total += size
    assert len(index["weight_map"]) == sum(1 for _ in _files(path)) and index["metadata"]["total_size"] == total
    assert list(index["weight_map"]) == sorted(index["weight_map"])
    return index


@pytest.mark.parametrize("family", list(CASES))
def test_streaming_merge_equals_the_whole_model_merge_bit_for_bit(tmp_path, family):
    base, trained, model = _trained(tmp_path, family)
    assert len(list(base.glob("*.safetensors"))) > 2  # the base is read shard by shard
    out = merge_checkpoint(None, trained, tmp_path / "merged", max_shard_size="400KB")  # base from base_model.json
    merged, reference = _files(out), _whole_model_merge(base, trained)
    assert merged.keys() == reference.keys()
    assert [k for k in merged if not torch.equal(merged[k], reference[k])] == []
    assert all(t.dtype == torch.bfloat16 for t in merged.values())
    changed = {k for k, v in _files(base).items() if not torch.equal(v, merged[k])}
    assert any(".experts.1." in k for k in changed) == ("routed_experts" in CASES[family])
    _check_index(out, parse_shard_size("400KB"))
    assert (out / "config.json").read_bytes() == (base / "config.json").read_bytes()

    # The merged dir loads here and in the official-code reference; its logits are the trained model's.
    batch = make_batch(model.config)
    with torch.no_grad():
        trained_logits = model.float()(**batch).logits
        merged_logits = DeepseekVL2ForCausalLM.from_pretrained(out).eval()(**batch).logits
    assert ((merged_logits - trained_logits).norm() / trained_logits.norm()).item() < 1e-2  # bf16 rounding
    official = load_official_state_dict(str(out), dtype=None)
    assert all(torch.equal(official[k], merged[k]) for k in merged)


def test_every_trained_tensor_must_be_met_in_the_base(tmp_path):
    """The merge's guard against a name that never matches (that part of the adapter would be dropped silently):
    before any base tensor, every trained tensor is pending (the routed experts' adapters as their stacked
    parameter); after all of them, none."""
    from deepseek_vl2_lora.policy.merge import _Merger

    base, trained, model = _trained(tmp_path, "tiny-mha")
    with torch.device("meta"):
        merger = _Merger(DeepseekVL2ForCausalLM(model.config), trained)
    experts = {f"language.model.layers.1.mlp.experts.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
    assert experts <= merger.pending and any(k.endswith("q_proj.weight") for k in merger.pending)
    with pytest.raises(ValueError, match="never met in the base checkpoint"):
        merger.check_done()
    for key, value in _files(base).items():
        merger(key, value, torch.bfloat16)
    merger.check_done()


def test_merge_in_float32_and_to_one_file(tmp_path):
    base, trained, _ = _trained(tmp_path, "tiny-mha")
    out = merge_checkpoint(base, trained, tmp_path / "merged", torch_dtype=torch.float32, max_shard_size="1GB")
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not (out / INDEX_FILE).exists()
    merged, reference = _files(out), _whole_model_merge(base, trained, torch.float32)
    assert all(torch.equal(merged[k], reference[k]) for k in reference)


def test_save_pretrained_cuts_hub_sized_shards_in_the_official_order(tmp_path):
    model = build_model("small-mla")
    model.save_pretrained(tmp_path / "ck", max_shard_size="200KB")  # (no tensor above it: those get a file alone)
    index = json.loads((tmp_path / "ck" / INDEX_FILE).read_text())
    order = list(official_shapes(model))  # layers in turn; each expert's three projections together
    assert order.index("language.model.layers.1.mlp.experts.0.down_proj.weight") + 1 == order.index(
        "language.model.layers.1.mlp.experts.1.gate_proj.weight"
    )
    files = [index["weight_map"][k] for k in order]
    assert files == sorted(files)  # each shard a contiguous run of the official order
    for name in set(files):
        keys = [k for k in order if index["weight_map"][k] == name]
        size = sum(math.prod(official_shapes(model)[k]) * 4 for k in keys)
        assert size <= 200_000
    loaded = DeepseekVL2ForCausalLM.from_pretrained(tmp_path / "ck")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_a_bad_shard_size_is_one_line_before_any_work(tmp_path):
    base, trained, _ = _trained(tmp_path, "tiny-mha")
    with pytest.raises(SystemExit) as e:  # vl2-merge / scripts/merge.py
        cli_merge([str(base), str(trained), str(tmp_path / "o"), "--max-shard-size=5XB"])
    assert str(e.value.code).startswith("error: shard size '5XB': expected bytes or a size like 5GB")
    assert "\n" not in str(e.value.code) and not (tmp_path / "o").exists()
    for size in ("0", "-1GB", "GB", "5 G B"):
        with pytest.raises(ValueError, match="shard size"):
            parse_shard_size(size)


def test_parse_shard_size_is_the_hub_s():
    assert parse_shard_size("5GB") == 5 * 10**9 and parse_shard_size("500MB") == 500 * 10**6
    assert parse_shard_size("2GiB") == 2 * 2**30 and parse_shard_size(1234) == 1234


# ------------------------------------------------------------------------------------------ full size (slow)
_FULL_SIZE = """
import json, sys, torch
from pathlib import Path
from deepseek_vl2_lora.model import DeepseekVL2ForCausalLM, VL2Config
from deepseek_vl2_lora.model.checkpoint import official_shapes
from deepseek_vl2_lora.model.tiny import make_released_random_checkpoint
from deepseek_vl2_lora.policy.adapters import save_trained_state
from deepseek_vl2_lora.policy.groups import apply_policy

base, trained = Path(sys.argv[1]), Path(sys.argv[2])
# random bf16 weights in one 6.7 GB file with an index, as the release has; written a tensor at a time (a shared
# test machine has no room for the whole model twice)
make_released_random_checkpoint(base, "deepseek-vl2-tiny", max_shard_size=10**12, device="cpu")
name = "model-00001-of-000001.safetensors"
(base / "model.safetensors").rename(base / name)
config = VL2Config.from_file(base / "config.json")
with torch.device("meta"):
    model = DeepseekVL2ForCausalLM(config)
shapes = official_shapes(model)
total = sum(torch.Size(s).numel() * 2 for s in shapes.values())
index = {"metadata": {"total_size": total}, "weight_map": {k: name for k in sorted(shapes)}}
(base / "model.safetensors.index.json").write_text(json.dumps(index))
g = torch.Generator().manual_seed(0)
# trained state: mha_lora + LoRA on every routed expert + the router in full, every tensor moved off its start
groups = {"mha_qkv": {"mode": "lora", "r": 16, "alpha": 32}, "o_proj": {"mode": "lora", "r": 16, "alpha": 32},
          "routed_experts": {"mode": "lora", "r": 8, "alpha": 16}, "router": {"mode": "train"}}
apply_policy(model, {"name": "big", "groups": groups})
for name, p in model.named_parameters():
    if p.requires_grad:
        owner, _, leaf = name.rpartition(".")
        value = torch.randn(p.shape, generator=g) * 0.02
        setattr(model.get_submodule(owner), leaf, torch.nn.Parameter(value))
save_trained_state(model, trained, base_model=base)
"""

_MERGE_AND_MEASURE = """
import sys, time
from deepseek_vl2_lora.policy.merge import merge_checkpoint
from deepseek_vl2_lora.training.metrics import peak_rss_bytes
t = time.perf_counter()
merge_checkpoint(None, sys.argv[1], sys.argv[2])
print(peak_rss_bytes(), time.perf_counter() - t)
"""


@pytest.mark.slow
def test_full_size_vl2_tiny_streaming_merge_peak_rss_and_bits(tmp_path):
    """VL2-Tiny at full size (3.4B, one 6.7 GB bf16 shard as released), random weights: the merge's peak RSS is at
    most the shard + the trained state + 1 GiB, and its output is the whole-model merge's, tensor by tensor."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    base, trained, out = tmp_path / "base", tmp_path / "trained", tmp_path / "merged"
    subprocess.run([sys.executable, "-c", _FULL_SIZE, str(base), str(trained)], check=True, env=env, timeout=1800)
    proc = subprocess.run(
        [sys.executable, "-c", _MERGE_AND_MEASURE, str(trained), str(out)],
        env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    peak, seconds = proc.stdout.split()
    shard = max(f.stat().st_size for f in base.glob("*.safetensors"))
    state = sum(f.stat().st_size for f in trained.glob("*.safetensors"))
    print(f"full-size VL2-Tiny merge: {seconds} s, peak RSS {int(peak) / 2**30:.2f} GiB, shard {shard / 2**30:.2f} GiB")
    assert int(peak) <= shard + state + 2**30
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model-00001-of-00002.safetensors",
                                                                 "model-00002-of-00002.safetensors"]  # fmt: skip
    _check_index(out, 5 * 10**9)
    _compare_full_size(base, trained, out)


def _compare_full_size(base: Path, trained: Path, out: Path) -> None:
    """Each merged tensor against the whole-model merge, computed a decoder layer at a time (the whole model in fp32
    would need 13.5 GB): the layer's base weights in fp32, the adapter, PEFT's merge (its dense einsum delta for the
    stacked experts), cast to bf16. Tensors outside the layers are the base's or the trained ones."""
    from deepseek_vl2_lora.model.checkpoint import stacked_key
    from deepseek_vl2_lora.model.config import VL2Config
    from deepseek_vl2_lora.policy.adapters import load_lora_tensors, read_trained_state
    from deepseek_vl2_lora.policy.groups import base_name

    with torch.device("meta"):
        model = DeepseekVL2ForCausalLM(VL2Config.from_file(base / "config.json"))
    apply_policy(model, json.loads((trained / "policy.json").read_text()))
    lora, full = read_trained_state(trained)
    load_lora_tensors(model, lora, trained)
    full = to_official(full)
    n_experts = model.config.language.n_routed_experts
    index = json.loads((out / INDEX_FILE).read_text())["weight_map"]
    base_file = next(base.glob("*.safetensors"))

    def read(keys: list[str]) -> tuple[dict, dict]:
        """(base tensors, merged tensors) of `keys`, the files opened for this call only: their mapped pages are
        released after each layer (the whole of both would be 13 GB)."""
        with safe_open(str(base_file), framework="pt") as fh:
            before = {k: fh.get_tensor(k).clone() for k in keys}
        after = {}
        for name in sorted({index[k] for k in keys}):
            with safe_open(str(out / name), framework="pt") as fh:
                after.update({k: fh.get_tensor(k).clone() for k in keys if index[k] == name})
        return before, after

    for i, layer in enumerate(model.language.model.layers):
        prefix = f"language.model.layers.{i}."
        before, after = read([k for k in index if k.startswith(prefix)])
        state, experts = {}, defaultdict(dict)  # per-expert official tensors stacked back into ours
        for key, value in before.items():
            name, e = stacked_key(key)
            if e is None:
                state[name] = value.float()
            else:
                experts[name][e] = value.float()
        state.update({name: torch.stack([by_e[e] for e in range(n_experts)]) for name, by_e in experts.items()})
        for name, p in list(layer.named_parameters()):
            if p.is_meta:
                owner, _, leaf = name.rpartition(".")
                value = nn.Parameter(state[base_name(prefix + name)], requires_grad=False)
                setattr(layer.get_submodule(owner), leaf, value)
        merge_lora(layer)
        reference = to_official({prefix + k: v for k, v in layer.state_dict().items()})
        assert reference.keys() == after.keys()
        for key, value in reference.items():
            expected = full[key] if key in full else value
            assert torch.equal(after[key], expected.float().to(torch.bfloat16)), key
        model.language.model.layers[i] = nn.Identity()  # free the layer
    before, after = read([k for k in index if not k.startswith("language.model.layers.")])
    for key, value in before.items():
        expected = full[key].float().to(torch.bfloat16) if key in full else value
        assert torch.equal(after[key], expected), key
