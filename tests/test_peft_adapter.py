"""`trained/` is a standard PEFT adapter: stock `peft.PeftModel.from_pretrained` on the base model reproduces the
trained model, for every policy preset; our loader, merge and the older trained-state format read it too."""

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers import build_model, make_batch, perturb_trainable
from safetensors.torch import load_file, save_file
from test_train_config import compose_cfg

from deepseek_vl2_lora import eval as eval_mod
from deepseek_vl2_lora.model import DeepseekVL2ForCausalLM
from deepseek_vl2_lora.policy.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    POLICY_FILE,
    TRAINED_TENSORS,
    load_trained_state,
    read_trained_state,
    resolve_trained_dir,
    save_trained_state,
)
from deepseek_vl2_lora.policy.groups import PolicyError, apply_policy, load_trainable_state_dict
from deepseek_vl2_lora.policy.merge import merge_checkpoint
from deepseek_vl2_lora.training import train
from deepseek_vl2_lora.training.preflight import resolve_model_dir
from deepseek_vl2_lora.training.train_state import TRAINABLE_FILE, list_checkpoints

ROOT = Path(__file__).resolve().parents[1]
STEPS = 2
PRESETS = {  # preset -> tiny family it fits (mha_lora needs the MHA family)
    "mla_lowrank": "full-noaux",
    "mla_lowrank_lora": "full-noaux",
    "lora_o_mlp": "full-noaux",
    "mha_lora": "tiny-mha",
    "full_lm": "full-noaux",
}


@pytest.fixture(autouse=True)
def tiny_cache(tmp_path_factory, monkeypatch):
    root = tmp_path_factory.getbasetemp() / "tiny_cache"  # the session's one cache (as test_train_loop)
    monkeypatch.setenv("DEEPSEEK_VL2_LORA_CACHE", str(root))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    return root


def _train(run_dir: Path, preset: str, *overrides: str):
    cfg = compose_cfg(
        "experiment=smoke",
        f"policy={preset}",
        f"model.tiny_family={PRESETS[preset]}",
        f"trainer.max_steps={STEPS}",
        f"trainer.save_every={STEPS}",  # the last step's checkpoint: the trained tensors as the loop held them
        "trainer.eval_before=false",
        "data.eval_path=null",
        *overrides,
    )
    train(cfg, run_dir)
    return resolve_model_dir(cfg.model)


def _end_of_training_model(base: Path, run_dir: Path) -> DeepseekVL2ForCausalLM:
    """The trained model rebuilt from the last checkpoint's trainable tensors (the training loop's own names), not
    from trained/: an independent reference for what trained/ must give."""
    model = DeepseekVL2ForCausalLM.from_pretrained(base)
    apply_policy(model, json.loads((run_dir / "trained" / POLICY_FILE).read_text()))
    last = list_checkpoints(run_dir)[-1]
    load_trainable_state_dict(model, load_file(Path(last) / TRAINABLE_FILE))
    return model.eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _stock_peft(base: Path, adapter: Path):
    """Exactly what a user of PEFT writes; a missing-keys warning from PEFT fails the test."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return PeftModel.from_pretrained(DeepseekVL2ForCausalLM.from_pretrained(base), adapter).eval()


@pytest.mark.parametrize("preset", list(PRESETS))
def test_stock_peft_loads_trained_dir_as_the_trained_model(tmp_path, preset):
    base = _train(tmp_path, preset)
    trained_dir = tmp_path / "trained"
    config = json.loads((trained_dir / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == str(base.resolve())
    assert not (trained_dir / TRAINED_TENSORS).exists()  # every trained tensor is in the PEFT adapter
    keys = load_file(trained_dir / ADAPTER_WEIGHTS).keys()
    assert keys and all(k.startswith("base_model.model.language.") for k in keys)

    batch = make_batch(DeepseekVL2ForCausalLM.from_pretrained(base).config)
    with torch.no_grad():
        reference = _end_of_training_model(base, tmp_path)(**batch).logits
        untrained = DeepseekVL2ForCausalLM.from_pretrained(base).eval()(**batch).logits
        peft_logits = _stock_peft(Path(config["base_model_name_or_path"]), trained_dir)(**batch).logits
        ours = DeepseekVL2ForCausalLM.from_pretrained(base)
        load_trained_state(ours, tmp_path)  # a run dir is accepted too
        ours_logits = ours.eval()(**batch).logits
    assert _rel(untrained, reference) > 1e-3  # training changed the model
    assert _rel(peft_logits, reference) <= 1e-5
    assert _rel(ours_logits, reference) <= 1e-5

    # The PEFT config says what trains: LoRA targets, and the fully trained modules whole.
    trainable = json.loads((tmp_path / "trainable_parameters.json").read_text())["trainable_names"]
    full = {n for n in trainable if "lora_" not in n}
    saved = {f"{m}.{k}" for m in config["modules_to_save"] or [] for k in ours.get_submodule(m).state_dict()}
    assert saved == full
    assert bool(config["target_parameters"]) == any(".experts.lora_" in n for n in trainable)


def test_routed_expert_lora_and_trained_router_through_stock_peft(tmp_path):
    """Parameter-targeted LoRA (stacked experts) beside a router trained in full: stock PEFT uses its own dense
    expert delta, equal to our low-rank forward."""
    routed = "policy.groups.routed_experts={mode: lora, r: 4, alpha: 8}"
    base = _train(tmp_path, "mla_lowrank_lora", routed, "policy.groups.router.mode=train")
    config = json.loads((tmp_path / "trained" / ADAPTER_CONFIG).read_text())
    assert config["target_parameters"] and any(m.endswith(".mlp.gate") for m in config["modules_to_save"])
    batch = make_batch(DeepseekVL2ForCausalLM.from_pretrained(base).config)
    with torch.no_grad():
        reference = _end_of_training_model(base, tmp_path)(**batch).logits
        peft_logits = _stock_peft(base, tmp_path / "trained")(**batch).logits
    assert _rel(peft_logits, reference) <= 1e-5


def test_previous_format_still_loads_and_merges(tmp_path):
    """A trained dir from before (LoRA keys without PEFT's prefix, trained tensors in trained_tensors.safetensors)
    loads into the same model; merge reads the new dir given its run dir."""
    base = _train(tmp_path, "mla_lowrank_lora")
    new = tmp_path / "trained"
    old = tmp_path / "old"
    old.mkdir()
    lora, full = read_trained_state(new)
    save_file(lora, str(old / ADAPTER_WEIGHTS))
    save_file(full, str(old / TRAINED_TENSORS))
    config = json.loads((new / ADAPTER_CONFIG).read_text())
    config.update(modules_to_save=None, base_model_name_or_path=None)
    (old / ADAPTER_CONFIG).write_text(json.dumps(config))
    (old / POLICY_FILE).write_text((new / POLICY_FILE).read_text())

    batch = make_batch(DeepseekVL2ForCausalLM.from_pretrained(base).config)
    logits = []
    for d in (new, old):
        model = DeepseekVL2ForCausalLM.from_pretrained(base)
        load_trained_state(model, d)
        with torch.no_grad():
            logits.append(model.eval()(**batch).logits)
    assert torch.equal(logits[0], logits[1])

    merge_checkpoint(base, tmp_path, tmp_path / "merged")  # the run dir stands for its trained dir
    with torch.no_grad():
        merged = DeepseekVL2ForCausalLM.from_pretrained(tmp_path / "merged").eval()(**batch).logits
    assert _rel(merged, logits[0]) <= 1e-5


def test_trained_dir_resolution_errors_are_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a trained-state directory") as e:
        resolve_trained_dir(tmp_path)
    assert "\n" not in str(e.value)
    (tmp_path / ADAPTER_CONFIG).write_text("{}")  # a PEFT adapter dir (no policy.json): its policy is derived...
    assert resolve_trained_dir(tmp_path) == tmp_path
    with pytest.raises(PolicyError, match="only LoRA adapters") as e:  # ...and this one is no LoRA adapter
        load_trained_state(build_model("tiny-mha"), tmp_path)
    assert "\n" not in str(e.value)


def _script(*args: str) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_merge_chat_and_eval_take_a_run_dir_a_trained_dir_or_a_merged_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    base = _train(run_dir, "mla_lowrank_lora")
    # merge.py without BASE: the adapter's base_model_name_or_path.
    _script("scripts/merge.py", str(run_dir), str(tmp_path / "merged"))
    batch = make_batch(DeepseekVL2ForCausalLM.from_pretrained(base).config)
    with torch.no_grad():
        merged = DeepseekVL2ForCausalLM.from_pretrained(tmp_path / "merged").eval()(**batch).logits
        reference = _end_of_training_model(base, run_dir)(**batch).logits
    assert _rel(merged, reference) <= 1e-5

    record = json.loads((ROOT / "data" / "demo" / "eval.jsonl").read_text().splitlines()[1])
    ask = ["--image", str(ROOT / "data" / "demo" / record["images"][0]), "--prompt", record["messages"][0]["content"]]
    ask += ["--attn", "eager", "--device", "cpu", "--max-new-tokens", "4"]
    answers = {
        what: _script("scripts/chat.py", *where, *ask)
        for what, where in {
            "run dir": [str(run_dir)],
            "trained dir": [str(run_dir / "trained")],
            "base + --trained": [str(base), "--trained", str(run_dir)],
            "merged": [str(tmp_path / "merged")],
        }.items()
    }
    assert len(set(answers.values())) == 1, answers

    # eval: a trained dir outside its run evaluates on the adapter's base checkpoint.
    shutil.copytree(run_dir / "trained", tmp_path / "moved")
    kind, cfg, trained, _ = eval_mod.resolve_target(str(tmp_path / "moved"), False, ["experiment=smoke"])
    assert (kind, trained, Path(cfg.model.path)) == ("trained", tmp_path / "moved", base.resolve())


def test_merge_cli_errors_are_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "scripts/merge.py", str(tmp_path), str(tmp_path / "out")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0
    assert "not a trained-state directory" in proc.stderr


@pytest.mark.parametrize(
    "groups",
    [
        {"vision": {"mode": "train"}, "projector": {"mode": "train"}},  # a whole tower as one module to save
        {"routed_experts": {"mode": "train"}, "router": {"mode": "train"}},  # stacked experts, router: their modules
        {"view_tokens": {"mode": "train"}},  # held by the top-level model: no module PEFT can wrap
    ],
    ids=["vision", "experts", "view_tokens"],
)
def test_groups_outside_the_presets(tmp_path, groups):
    model = build_model("full-noaux")
    model.save_pretrained(tmp_path / "base")
    apply_policy(model, {"name": "x", "groups": {"kv_low_rank": {"mode": "train"}, **groups}})
    perturb_trainable(model)
    save_trained_state(model, tmp_path / "trained", base_model=tmp_path / "base")
    batch = make_batch(model.config)
    ours = DeepseekVL2ForCausalLM.from_pretrained(tmp_path / "base")
    load_trained_state(ours, tmp_path / "trained")
    with torch.no_grad():
        reference = model.eval()(**batch).logits
        assert torch.equal(ours.eval()(**batch).logits, reference)
        peft_logits = _stock_peft(tmp_path / "base", tmp_path / "trained")(**batch).logits
    outside = (tmp_path / "trained" / TRAINED_TENSORS).exists()
    assert outside == ("view_tokens" in groups)
    if outside:  # stock PEFT has everything but the view tokens
        assert set(load_file(tmp_path / "trained" / TRAINED_TENSORS)) == {"image_newline", "view_seperator"}
        assert _rel(peft_logits, reference) > 1e-3
    else:
        assert _rel(peft_logits, reference) <= 1e-5
