"""Freezing policy: group coverage, presets resolved per family, gradients, LoRA invariants, save/load/merge."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import FAMILIES, build_model, make_batch

from deepseek_vl2_lora.model import DeepseekVL2ForCausalLM
from deepseek_vl2_lora.policy.adapters import load_trained_state, save_trained_state
from deepseek_vl2_lora.policy.config import GROUP_NAMES
from deepseek_vl2_lora.policy.groups import GROUPS, PolicyError, apply_policy, group_of, optimizer_param_groups
from deepseek_vl2_lora.policy.lora import merge_lora

PRESETS = Path(__file__).resolve().parents[1] / "deepseek_vl2_lora" / "configs" / "policy"


def preset(name, **group_changes):
    cfg = yaml.safe_load((PRESETS / f"{name}.yaml").read_text())
    for g, spec in group_changes.items():
        cfg["groups"][g] = spec
    return cfg


# Independent expectation of each preset, by plain substring rules on the official names.
MLA_LOWRANK = ("q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj")


def expected_trainable(name: str, preset_name: str, use_mla: bool) -> bool:
    if preset_name == "mla_lowrank":
        return any(f".self_attn.{m}." in name for m in MLA_LOWRANK)
    if preset_name in ("mla_lowrank_lora", "lora_o_mlp"):
        lora_targets = (".self_attn.o_proj.", ".mlp.gate_proj.", ".mlp.up_proj.", ".mlp.down_proj.", ".shared_experts.")
        is_lora = ".lora_" in name and any(t in name for t in lora_targets)
        return is_lora or (preset_name == "mla_lowrank_lora" and expected_trainable(name, "mla_lowrank", use_mla))
    if preset_name == "mha_lora":
        return ".lora_" in name and any(f".self_attn.{m}." in name for m in ("q_proj", "k_proj", "v_proj", "o_proj"))
    if preset_name == "full_lm":
        return name.startswith("language.")
    raise AssertionError(preset_name)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_parameter_in_exactly_one_group(family):
    model = build_model(family)
    use_mla = model.config.language.use_mla
    for name, _ in model.named_parameters():
        hits = [g for g, pat in GROUPS if pat.search(name)]
        hits = [g for g in hits if not (g == "q_proj" and not use_mla) and not (g == "mha_qkv" and use_mla)]
        assert len(hits) == 1, (name, hits)
        assert group_of(name, use_mla) == hits[0]
    assert {g for g, _ in GROUPS} == set(GROUP_NAMES)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", ["mla_lowrank", "mla_lowrank_lora", "lora_o_mlp", "mha_lora", "full_lm"])
def test_trainable_set_and_gradients_per_preset(family, name):
    model = build_model(family).train()
    use_mla = model.config.language.use_mla
    fits = not ((name.startswith("mla") and not use_mla) or (name == "mha_lora" and use_mla))
    if not fits:
        with pytest.raises(PolicyError, match="mha_lora" if not use_mla else "mla_lowrank"):
            apply_policy(model, preset(name))
        return
    report = apply_policy(model, preset(name))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for n, _ in model.named_parameters() if expected_trainable(n, name, use_mla)}
    assert trainable == expected
    assert set(report.trainable_names) == trainable
    assert not any(n.startswith(("vision.", "projector.")) for n in trainable)
    out = model(**make_batch(model.config))
    (out.loss + out.aux_loss).backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in trainable and "e_score_correction_bias" not in n), n


def test_mha_checkpoint_with_mla_preset_names_mha_lora():
    with pytest.raises(PolicyError, match=r"MHA checkpoint.*|use policy=mha_lora") as e:
        apply_policy(build_model("tiny-mha"), preset("mla_lowrank"))
    assert "mha_lora" in str(e.value)


def test_required_group_missing_is_an_error_or_a_recorded_skip():
    cfg = preset("mla_lowrank", q_low_rank={"mode": "train"})  # required: small-mla has no q_a_proj
    with pytest.raises(PolicyError, match="q_low_rank.*matches nothing.*q_lora_rank: null"):
        apply_policy(build_model("small-mla"), cfg)
    report = apply_policy(build_model("small-mla"), {**cfg, "on_missing": "skip"})
    assert any("q_low_rank" in w for w in report.warnings)
    assert "WARNING" in report.table()


def test_layer_range_restricts_a_group():
    model = build_model("small-mla")
    apply_policy(model, preset("mla_lowrank", kv_low_rank={"mode": "train", "layers": [2]}))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("language.model.layers.2.") for n in trainable)


def test_dora_on_routed_experts_is_a_clear_error():
    with pytest.raises(PolicyError, match="routed_experts.*neither dora nor dropout"):
        apply_policy(build_model("small-mla"), preset("lora_o_mlp", routed_experts={"mode": "lora", "dora": True}))


def test_unknown_group_and_mode_are_errors():
    with pytest.raises(PolicyError, match="unknown policy group"):
        apply_policy(build_model("small-mla"), {"name": "x", "groups": {"kv_lowrank": {"mode": "train"}}})
    with pytest.raises(PolicyError, match="mode='tune'"):
        apply_policy(build_model("small-mla"), {"name": "x", "groups": {"kv_low_rank": {"mode": "tune"}}})


@pytest.mark.parametrize("options", [{}, {"dora": True}, {"rslora": True}])
def test_lora_at_init_leaves_logits_unchanged(options):
    model = build_model("full-noaux").eval()
    batch = make_batch(model.config)
    with torch.no_grad():
        before = model(**batch).logits
    lora = {"mode": "lora", "r": 4, "alpha": 8, **options}
    routed = lora if not options.get("dora") else {"mode": "freeze"}  # PEFT parameter targets: no DoRA
    apply_policy(model, preset("lora_o_mlp", o_proj=lora, mlp_dense=lora, shared_experts=lora, routed_experts=routed))
    assert any(".experts." in n and "lora_" in n for n, _ in model.named_parameters()) == (routed is lora)
    with torch.no_grad():
        after = model(**batch).logits
    assert torch.allclose(before, after, atol=1e-6)


def _perturb_trainable(model):
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _trained_model(family="full-noaux"):
    model = build_model(family)
    lora = {"mode": "lora", "r": 4, "alpha": 8}
    apply_policy(model, preset("mla_lowrank_lora", routed_experts=lora, router={"mode": "train"}))
    _perturb_trainable(model)
    return model.eval()


def test_trained_state_round_trip_and_merge(tmp_path):
    model = _trained_model()
    batch = make_batch(model.config)
    with torch.no_grad():
        trained = model(**batch).logits
    save_trained_state(model, tmp_path / "trained")
    files = {p.name for p in (tmp_path / "trained").iterdir()}
    assert files == {"adapter_config.json", "adapter_model.safetensors", "policy.json"}  # a PEFT adapter + policy

    base = build_model("full-noaux")
    base.save_pretrained(tmp_path / "base")
    reloaded = DeepseekVL2ForCausalLM.from_pretrained(tmp_path / "base")
    load_trained_state(reloaded, tmp_path / "trained")
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, trained)

    from deepseek_vl2_lora.policy.merge import merge_checkpoint

    merge_checkpoint(tmp_path / "base", tmp_path / "trained", tmp_path / "merged")
    merged = DeepseekVL2ForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in n or "base_layer" in n for n, _ in merged.named_parameters())
    assert json.loads((tmp_path / "merged" / "config.json").read_text()) == json.loads(
        (tmp_path / "base" / "config.json").read_text()
    )
    with torch.no_grad():
        assert torch.allclose(merged(**batch).logits, trained, atol=1e-4)
    # The merged directory read by the independent official-style forward (stand-in for the official loader).
    from official_ref.forward import official_forward

    official = official_forward(str(tmp_path / "merged"), batch)["logits"]
    real = batch["attention_mask"].bool()
    assert ((official[real] - trained[real]).norm() / trained[real].norm()).item() <= 1e-4


def test_merge_in_memory_equals_unmerged():
    model = _trained_model("small-mla")
    batch = make_batch(model.config)
    with torch.no_grad():
        before = model(**batch).logits
        after = merge_lora(model)(**batch).logits
    assert torch.allclose(before, after, atol=1e-5)


def test_optimizer_groups_hold_exactly_the_trainable_parameters():
    model = _trained_model()
    groups = optimizer_param_groups(model, model.policy_config, lr=1e-3, weight_decay=0.1)
    in_opt = {id(p) for g in groups for p in g["params"]}
    assert in_opt == {id(p) for p in model.parameters() if p.requires_grad}
    assert all(g["weight_decay"] == 0.0 for g in groups if g["name"].endswith("/no_decay"))


def test_report_json_lists_trainable_names(tmp_path):
    model = build_model("full-noaux")
    report = apply_policy(model, preset("mla_lowrank"))
    report.write_json(tmp_path / "trainable_parameters.json")
    data = json.loads((tmp_path / "trainable_parameters.json").read_text())
    assert set(data["trainable_names"]) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert data["trainable_params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert {g["group"] for g in data["groups"]} >= {"vision", "projector", "q_low_rank", "kv_low_rank"}


def _expert_lora_model(kernel, r=4):
    model = build_model("full-noaux", experts_kernel=kernel)
    lora = {"mode": "lora", "r": r, "alpha": 8}
    apply_policy(model, preset("mla_lowrank_lora", routed_experts=lora))
    _perturb_trainable(model)  # lora_B leaves zero: the update is real
    return model.train()


def test_expert_lora_factors_are_pefts_delta():
    from peft.tuners.lora.layer import ParamWrapper

    from deepseek_vl2_lora.policy.lora import expert_lora_factors

    model = _expert_lora_model("loop")
    wrappers = [m for m in model.modules() if isinstance(m, ParamWrapper)]
    assert wrappers
    for w in wrappers:
        _, factors = expert_lora_factors(w)
        ((b, a, scale),) = factors[w.parameter_name]
        torch.testing.assert_close(scale * b @ a, w.get_delta_weight("default"), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kernel", ["loop", "grouped"])
@pytest.mark.parametrize("r", [4, 8])
def test_low_rank_expert_lora_equals_pefts_dense_delta(kernel, r):
    """Routed-expert LoRA runs as per-token low-rank matmuls; PEFT's own forward (dense delta added to the
    weight) is the reference: same loss, same gradients for every trainable tensor."""
    from peft.tuners.lora.layer import ParamWrapper

    model = _expert_lora_model(kernel, r)
    batch = make_batch(model.config)

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        out = model(**batch, return_logits=False)
        (out.loss + out.aux_loss).backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    ours = loss_and_grads()
    patched = [m for m in model.modules() if isinstance(m, ParamWrapper) and "forward" in vars(m)]
    assert patched
    for m in patched:
        del m.forward  # back to PEFT's class forward
    peft_loss, peft_grads = loss_and_grads()
    torch.testing.assert_close(ours[0], peft_loss, rtol=1e-5, atol=1e-6)
    assert any("experts" in n and "lora_A" in n for n in peft_grads)
    for name, g in peft_grads.items():
        torch.testing.assert_close(ours[1][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_routed_expert_lora_alone():
    """Parameter targets without any Linear target: PEFT must not try to guess modules from a model type."""
    model = build_model("small-mla")
    report = apply_policy(model, preset("mla_lowrank", routed_experts={"mode": "lora", "r": 4, "alpha": 8}))
    lora = [n for n in report.trainable_names if "lora_" in n]
    assert lora and all(".mlp.experts." in n for n in lora)
