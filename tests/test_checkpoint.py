"""Checkpoint I/O: official key layout, save -> load round trips, strict and clear errors."""

import json

import pytest
import torch
from helpers import FAMILIES, build_model, make_batch
from safetensors.torch import load_file, save_file

from deepseek_vl2_lora.model import DeepseekVL2ForCausalLM


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sharded", [False, True])
def test_save_load_round_trip(tmp_path, family, sharded):
    model = build_model(family).eval()
    model.save_pretrained(tmp_path / "ck", max_shard_size=200_000 if sharded else "5GB")
    files = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert ("model.safetensors.index.json" in files) == sharded
    loaded = DeepseekVL2ForCausalLM.from_pretrained(tmp_path / "ck")
    batch = make_batch(model.config)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)
    # and saving again writes the same keys, shapes and config
    loaded.save_pretrained(tmp_path / "again")
    a = load_file(tmp_path / "again" / "model.safetensors")
    b = {}
    for f in (tmp_path / "ck").glob("*.safetensors"):
        b.update(load_file(f))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "again" / "config.json").read_text()) == json.loads(
        (tmp_path / "ck" / "config.json").read_text()
    )


def test_official_key_names(tmp_path):
    build_model("full-noaux").save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "model.safetensors"))
    layer1 = "language.model.layers.1."
    for k in [
        "vision.pos_embed",
        "vision.attn_pool.latent",
        "vision.blocks.0.attn.qkv.weight",
        "vision.norm.weight",
        "projector.layers.0.weight",
        "projector.layers.2.bias",
        "image_newline",
        "view_seperator",
        "language.model.embed_tokens.weight",
        "language.lm_head.weight",
        "language.model.norm.weight",
        "language.model.layers.0.mlp.gate_proj.weight",
        layer1 + "self_attn.q_a_proj.weight",
        layer1 + "self_attn.q_a_layernorm.weight",
        layer1 + "self_attn.q_b_proj.weight",
        layer1 + "self_attn.kv_a_proj_with_mqa.weight",
        layer1 + "self_attn.kv_a_layernorm.weight",
        layer1 + "self_attn.kv_b_proj.weight",
        layer1 + "mlp.gate.weight",
        layer1 + "mlp.gate.e_score_correction_bias",
        layer1 + "mlp.experts.7.down_proj.weight",
        layer1 + "mlp.shared_experts.up_proj.weight",
    ]:
        assert k in keys, k
    assert not any(".experts.gate_proj" in k for k in keys)  # stacked names never reach the file


def _saved(tmp_path, family="small-mla"):
    build_model(family).save_pretrained(tmp_path / "ck")
    return tmp_path / "ck", load_file(tmp_path / "ck" / "model.safetensors")


def test_missing_key_is_named(tmp_path):
    path, sd = _saved(tmp_path)
    del sd["language.model.layers.2.mlp.experts.3.up_proj.weight"]
    save_file(sd, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing keys \(1\): language.model.layers.2.mlp.experts.3.up_proj"):
        DeepseekVL2ForCausalLM.from_pretrained(path)


def test_unexpected_key_is_named(tmp_path):
    path, sd = _saved(tmp_path)
    sd["language.model.layers.1.self_attn.q_a_proj.weight"] = torch.zeros(2, 2)
    save_file(sd, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): language.model.layers.1.self_attn.q_a_proj"):
        DeepseekVL2ForCausalLM.from_pretrained(path)


def test_shape_mismatch_names_key_and_both_shapes(tmp_path):
    path, sd = _saved(tmp_path)
    sd["language.model.layers.1.self_attn.kv_b_proj.weight"] = torch.zeros(64, 16)
    save_file(sd, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"kv_b_proj.weight: checkpoint \(64, 16\) vs model \(128, 32\)"):
        DeepseekVL2ForCausalLM.from_pretrained(path)


def test_vocab_mismatch_hints_at_vocab_size(tmp_path):
    path, _ = _saved(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["language_config"]["vocab_size"] = 129280
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="vocab_size must equal the rows of embed_tokens"):
        DeepseekVL2ForCausalLM.from_pretrained(path)


def test_directory_problems_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        DeepseekVL2ForCausalLM.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        DeepseekVL2ForCausalLM.from_pretrained(tmp_path)
    path, _ = _saved(tmp_path)
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors or model.safetensors.index.json"):
        DeepseekVL2ForCausalLM.from_pretrained(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        DeepseekVL2ForCausalLM.from_pretrained(path)


def test_attention_name_checked_against_checkpoint(tmp_path):
    path, _ = _saved(tmp_path, "tiny-mha")
    with pytest.raises(ValueError, match="mla_sdpa.*does not fit an MHA"):
        DeepseekVL2ForCausalLM.from_pretrained(path, attn_implementation="mla_sdpa")
    model = DeepseekVL2ForCausalLM.from_pretrained(path, attn_implementation="sdpa")
    assert model.attn_implementation == "mha_sdpa"


def test_bf16_load(tmp_path):
    path, _ = _saved(tmp_path)
    model = DeepseekVL2ForCausalLM.from_pretrained(path, torch_dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.language.model.layers[0].self_attn.rotary.inv_freq.dtype == torch.float32


def test_random_checkpoint_written_shard_by_shard_is_the_tiny_models_weights(tmp_path):
    """tiny.write_random_checkpoint (what the full-size random checkpoints use): bf16 shards with an index in the
    official layout, each tensor `_init_random`'s value for the model the config describes (built independently
    here), rounded to bf16."""
    from deepseek_vl2_lora.model.tiny import family_config, write_random_checkpoint

    raw = family_config("small-mla", 300)
    out = write_random_checkpoint(tmp_path / "ck", raw, seed=3, dtype=torch.bfloat16, max_shard_size=100_000)
    shards = sorted(p.name for p in out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and (out / "model.safetensors.index.json").is_file()
    assert json.loads((out / "config.json").read_text()) == raw
    loaded = DeepseekVL2ForCausalLM.from_pretrained(out, torch_dtype=torch.bfloat16)
    expected = build_model("small-mla", vocab=300, seed=3)
    for name, p in expected.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], p.to(torch.bfloat16)), name
