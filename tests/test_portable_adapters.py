"""Adapters that travel: the Hub id as base_model_name_or_path, a stock PEFT adapter (no policy.json) loaded and used
as a run's start (`model.init_from`), and a step checkpoint exported as a stock-PEFT trained dir."""

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from helpers import make_batch, perturb_trainable, session_tiny_cache
from safetensors.torch import load_file
from test_train_config import compose_cfg

from deepseek_vl2_lora import eval as eval_mod
from deepseek_vl2_lora.export import main as export_main
from deepseek_vl2_lora.model import DeepseekVL2ForCausalLM
from deepseek_vl2_lora.model.tiny import ensure_tiny_checkpoint
from deepseek_vl2_lora.policy.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    BASE_MODEL_FILE,
    POLICY_FILE,
    load_trained_state,
    resolve_trained_model,
)
from deepseek_vl2_lora.policy.foreign import policy_from_adapter
from deepseek_vl2_lora.policy.groups import PolicyError
from deepseek_vl2_lora.training import train
from deepseek_vl2_lora.training.export import export_checkpoint
from deepseek_vl2_lora.training.train_state import ResumeError

HUB_ID = "deepseek-ai/deepseek-vl2-tiny"  # any Hub id: nothing is downloaded
FAST = ["experiment=smoke", "trainer.eval_before=false", "data.eval_path=null"]


@pytest.fixture(autouse=True)
def tiny_cache(tmp_path_factory, monkeypatch):
    return session_tiny_cache(tmp_path_factory, monkeypatch)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _stock_peft(base: Path, adapter: Path):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. PEFT's warning about unknown adapter_config.json keys
        return PeftModel.from_pretrained(DeepseekVL2ForCausalLM.from_pretrained(base), adapter).eval()


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    """An adapter written by stock PEFT on our model (LoRA on every o_proj, lm_head trained whole), its values
    moved off their initialisation, and the PeftModel's logits."""
    from peft import LoraConfig, get_peft_model

    base = ensure_tiny_checkpoint("full-noaux")  # the smoke experiment's base
    model = get_peft_model(
        DeepseekVL2ForCausalLM.from_pretrained(base),
        LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj"], modules_to_save=["lm_head"]),
    )
    perturb_trainable(model, seed=0)
    out = tmp_path_factory.mktemp("foreign") / "adapter"
    model.save_pretrained(out)
    batch = make_batch(model.base_model.model.config)
    with torch.no_grad():
        logits = model.eval()(**batch).logits
    return out, base, batch, logits


def test_a_stock_peft_adapter_loads_as_its_policy(foreign):
    adapter, base, batch, logits = foreign
    assert not (adapter / POLICY_FILE).exists()
    ours = DeepseekVL2ForCausalLM.from_pretrained(base)
    report = load_trained_state(ours, adapter)
    assert {r.group: r.mode for r in report.groups if r.mode != "freeze"} == {"o_proj": "lora", "lm_head": "train"}
    with torch.no_grad():
        assert _rel(ours.eval()(**batch).logits, logits) <= 1e-5


def test_targets_that_are_part_of_a_group_are_a_one_line_error(tmp_path):
    from peft import LoraConfig

    model = DeepseekVL2ForCausalLM.from_pretrained(ensure_tiny_checkpoint("full-noaux"))
    LoraConfig(r=4, target_modules=["q_a_proj", "o_proj"], modules_to_save=["kv_a_layernorm"]).save_pretrained(tmp_path)
    with pytest.raises(PolicyError) as e:
        policy_from_adapter(model.config, tmp_path / ADAPTER_CONFIG)
    message = str(e.value)
    assert "\n" not in message and "map onto no policy group" in message
    assert "self_attn.q_a_proj.weight (part of the group q_low_rank)" in message
    assert "self_attn.kv_a_layernorm.weight (modules_to_save: part of kv_low_rank)" in message
    assert "o_proj" not in message.replace("adapter targets", "")  # o_proj maps: not named
    LoraConfig(r=4, target_modules=["no_such_module"]).save_pretrained(tmp_path / "none")
    with pytest.raises(PolicyError, match="no_such_module") as e:
        policy_from_adapter(model.config, tmp_path / "none" / ADAPTER_CONFIG)
    assert "\n" not in str(e.value)


def test_init_from_a_stock_adapter_starts_a_fresh_run_from_its_values(foreign, tmp_path):
    adapter, _, _, _ = foreign
    run = tmp_path / "stage2"
    steps = ["trainer.max_steps=1", "trainer.save_every=1", "optim.lr=1e-9", "optim.warmup_steps=0"]
    result = train(compose_cfg(*FAST, f"model.init_from={adapter}", "policy=mla_lowrank", *steps), run)
    assert result.steps == 1
    config = (run / "config_resolved.yaml").read_text()
    assert f"init_from: {adapter}" in config and "name: adapter:adapter" in config  # the adapter's policy
    trainable = json.loads((run / "trainable_parameters.json").read_text())["trainable_names"]
    assert trainable and all(".o_proj.lora_" in n or n == "language.lm_head.weight" for n in trainable)
    start, after = load_file(adapter / ADAPTER_WEIGHTS), load_file(run / "trained" / ADAPTER_WEIGHTS)
    assert start.keys() == after.keys()
    # one Adam step of lr 1e-9 from the adapter's values (a fresh LoRA would have B = 0, the adapter's is not)
    assert all((after[k] - start[k]).abs().max() < 1e-7 for k in start)
    assert max(v.abs().max() for k, v in start.items() if "lora_B" in k) > 1e-2

    # Its checkpoint resumes only with the same start; without it, one line says so.
    with pytest.raises(ResumeError, match="model.init_from") as e:
        train(compose_cfg(*FAST, "trainer.max_steps=2", "trainer.resume=auto"), run)
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def run_with_checkpoint(tmp_path_factory):
    run = tmp_path_factory.mktemp("export") / "run"
    routed = "policy.groups.routed_experts={mode: lora, r: 4, alpha: 8}"
    cfg = compose_cfg(
        "experiment=smoke", "policy=mla_lowrank_lora", routed, "trainer.eval_before=false", "trainer.max_steps=2",
        "trainer.save_every=2", f"model.hub_id={HUB_ID}",
    )  # fmt: skip
    train(cfg, run)
    return run, ensure_tiny_checkpoint("full-noaux")


def test_trained_dir_names_the_hub_id_and_keeps_the_local_path(run_with_checkpoint, tmp_path):
    run, base = run_with_checkpoint
    trained = run / "trained"
    assert json.loads((trained / ADAPTER_CONFIG).read_text())["base_model_name_or_path"] == HUB_ID
    assert json.loads((trained / BASE_MODEL_FILE).read_text()) == {"hub_id": HUB_ID, "local_path": str(base.resolve())}
    moved = tmp_path / "moved"
    shutil.copytree(trained, moved)
    assert resolve_trained_model(moved) == (base.resolve(), moved)  # merge and chat find the base
    (moved / BASE_MODEL_FILE).write_text(json.dumps({"hub_id": HUB_ID, "local_path": None}))  # elsewhere
    with pytest.raises(FileNotFoundError, match=f"'{HUB_ID}'.*pass the base checkpoint dir"):
        resolve_trained_model(moved)
    with pytest.raises(eval_mod.EvalError, match=f"'{HUB_ID}'.*pass model.path"):
        eval_mod.resolve_target(str(moved), False, [])


def test_export_of_a_step_checkpoint_is_the_trained_dir_in_stock_peft(run_with_checkpoint, tmp_path, capsys):
    run, base = run_with_checkpoint
    step = run / "checkpoints" / "step_00000002"  # the last step: what trained/ holds
    out = export_checkpoint(step, tmp_path / "exported")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (run / "trained").iterdir())
    assert json.loads((out / ADAPTER_CONFIG).read_text()) == json.loads((run / "trained" / ADAPTER_CONFIG).read_text())
    batch = make_batch(DeepseekVL2ForCausalLM.from_pretrained(base).config)
    with torch.no_grad():
        exported = _stock_peft(base, out)(**batch).logits
        trained = _stock_peft(base, run / "trained")(**batch).logits
        untrained = DeepseekVL2ForCausalLM.from_pretrained(base).eval()(**batch).logits
    assert torch.equal(exported, trained) and _rel(untrained, trained) > 1e-4

    # The command: a run dir stands for its newest checkpoint; mistakes are one line.
    assert export_main([str(run), str(tmp_path / "from_run")]) == 0
    assert load_file(tmp_path / "from_run" / ADAPTER_WEIGHTS).keys() == load_file(out / ADAPTER_WEIGHTS).keys()
    capsys.readouterr()
    assert export_main([str(tmp_path), str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "not a step checkpoint" in err and err.count("\n") == 1
    empty_run = tmp_path / "empty_run"  # a run dir that saved no checkpoint yet
    empty_run.mkdir()
    shutil.copy(run / "config_resolved.yaml", empty_run)
    assert export_main([str(empty_run), str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "a run directory without an intact checkpoint" in err and err.count("\n") == 1


def test_eval_of_a_step_checkpoint_is_the_run_s_final_eval(run_with_checkpoint):
    run, _ = run_with_checkpoint
    assert eval_mod.main([str(run / "checkpoints" / "step_00000002")]) == 0
    ev = json.loads((run / "eval_step_00000002.json").read_text())
    after = json.loads((run / "summary.json").read_text())["eval_after"]
    assert ev["kind"] == "trained" and ev["metrics"] == pytest.approx(after, rel=1e-6)
