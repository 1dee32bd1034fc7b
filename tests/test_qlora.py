"""Training, eval, chat and merge on a quantized frozen base (`model.quantize`), end to end on the tiny family:
the default experiment learns as the full-precision one does; the trained state is what it is without quantization;
eval and chat load the quantized base; merging applies the trained tensors to the original weights."""

import json
import logging
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from helpers import make_batch
from safetensors.torch import load_file
from test_train_config import compose_cfg

from deepseek_vl2_lora import REPO_ROOT
from deepseek_vl2_lora import eval as eval_mod
from deepseek_vl2_lora.model import DeepseekVL2ForCausalLM
from deepseek_vl2_lora.model.quant import QuantLinear, quantized_weights
from deepseek_vl2_lora.model.tiny import make_released_random_checkpoint
from deepseek_vl2_lora.policy.adapters import load_trained_state
from deepseek_vl2_lora.policy.lora import merge_lora
from deepseek_vl2_lora.policy.merge import merge_checkpoint
from deepseek_vl2_lora.training import train
from deepseek_vl2_lora.training.preflight import resolve_model_dir


@pytest.fixture(autouse=True)
def tiny_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DEEPSEEK_VL2_LORA_CACHE", str(tmp_path_factory.getbasetemp() / "tiny_cache"))
    monkeypatch.setenv("WANDB_MODE", "disabled")


def test_default_experiment_on_an_nf4_base_learns_and_prints_the_quantized_size(tmp_path, caplog):
    """`python train.py model.quantize=nf4`, shortened for CI to 80 steps and 32 eval samples (the full run is the
    slow test below): from 0 % the eval accuracy rises by more than 30 points (measured: 59), as the full-precision
    run's does."""
    short = ("trainer.max_steps=80", "trainer.eval_every=0", "data.eval_limit=32", "trainer.progress_bar=false")
    cfg = compose_cfg("model.quantize=nf4", *short)
    with caplog.at_level(logging.INFO):
        result = train(cfg, tmp_path)
    before, after = result.eval_before["eval/accuracy"], result.eval_after["eval/accuracy"]
    assert after - before >= 0.30, (before, after)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("quantized base"))
    assert re.fullmatch(r"quantized base \(model.quantize=nf4\): 18 frozen weights in [\d.]+ KiB \(.+\)", line), line
    trainable = json.loads((tmp_path / "trainable_parameters.json").read_text())
    assert all(".self_attn.q_" in n or ".self_attn.kv_" in n for n in trainable["trainable_names"])


def _smoke(run_dir, *overrides):
    cfg = compose_cfg(
        "experiment=smoke", "model.tiny_family=tiny-mha", "policy=mha_lora", "optim.warmup_steps=0", *overrides
    )
    return cfg, train(cfg, run_dir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three LoRA steps on VL2-Tiny's shape (q/k/v/o LoRA), on an nf4 base and on the full-precision one."""
    mp = pytest.MonkeyPatch()
    mp.setenv("DEEPSEEK_VL2_LORA_CACHE", str(tmp_path_factory.getbasetemp() / "tiny_cache"))
    mp.setenv("WANDB_MODE", "disabled")
    root = tmp_path_factory.mktemp("qlora")
    out = {}
    for quantize in ("none", "nf4"):
        cfg, result = _smoke(root / quantize, f"model.quantize={quantize}")
        out[quantize] = (cfg, result)
    mp.undo()
    return out


def test_the_trained_state_of_a_quantized_run_is_what_it_is_without_quantization(runs):
    """trained/ holds the same files, the same tensor names, shapes and dtypes and the same PEFT config: LoRA only,
    nothing of the quantized storage; the LoRA factors trained on the two bases differ (the bases do)."""
    plain, quant = (runs[q][1].trained_dir for q in ("none", "nf4"))
    assert sorted(p.name for p in plain.iterdir()) == sorted(p.name for p in quant.iterdir())
    for name in ("adapter_config.json", "policy.json"):
        assert json.loads((plain / name).read_text()) == json.loads((quant / name).read_text()), name
    a, b = load_file(plain / "adapter_model.safetensors"), load_file(quant / "adapter_model.safetensors")
    assert {k: (v.shape, v.dtype) for k, v in a.items()} == {k: (v.shape, v.dtype) for k, v in b.items()}
    assert all("lora_" in k for k in b) and not torch.equal(a[sorted(a)[-1]], b[sorted(b)[-1]])


def test_eval_and_chat_run_on_the_quantized_base(runs):
    cfg, result = runs["nf4"]
    run_dir = result.run_dir
    out = eval_mod.evaluate_config(eval_mod.run_config(run_dir), run_dir / "trained", device="cpu")
    assert out["metrics"]["eval/loss"] == pytest.approx(result.eval_after["eval/loss"], rel=1e-6)

    from deepseek_vl2_lora.evaluation import chat

    args = chat.parse_args([str(run_dir), "--quantize", "nf4", "--device", "cpu", "--attn", "eager"])
    bot = chat.Chat(args)
    layer = bot.model.language.model.layers[0]
    assert isinstance(layer.self_attn.o_proj.base_layer, QuantLinear) and quantized_weights(bot.model)
    answer = bot.answer([([{"role": "user", "content": "Say something."}], [])])
    assert len(answer) == 1 and isinstance(answer[0], str)


def test_merge_of_a_quantized_run_applies_its_tensors_to_the_original_weights(runs, tmp_path, caplog):
    """The merged checkpoint equals the full-precision base with the same trained tensors merged in memory (not the
    dequantized base: that differs by the quantization error), and the independent official forward reads it."""
    cfg, result = runs["nf4"]
    base = resolve_model_dir(cfg.model)
    with caplog.at_level(logging.INFO):
        merge_checkpoint(None, result.run_dir, tmp_path / "merged")
    assert "training ran on a nf4-quantized copy of them" in caplog.text
    expected = DeepseekVL2ForCausalLM.from_pretrained(base)
    load_trained_state(expected, result.trained_dir)
    merge_lora(expected)
    merged = DeepseekVL2ForCausalLM.from_pretrained(tmp_path / "merged")
    batch = make_batch(merged.config, vocab=merged.config.language.vocab_size)
    with torch.no_grad():
        want, got = expected.eval()(**batch).logits, merged.eval()(**batch).logits
        dequantized = DeepseekVL2ForCausalLM.from_pretrained(base, quantize="nf4")
        load_trained_state(dequantized, result.trained_dir)
        on_quantized = dequantized.eval()(**batch).logits
    real = batch["attention_mask"].bool()

    def rel(a, b):
        return ((a[real] - b[real]).norm() / b[real].norm()).item()

    assert rel(got, want) <= 1e-6
    assert rel(on_quantized, want) > 100 * max(rel(got, want), 1e-7)  # what merging dequantized weights would give
    from official_ref.forward import official_forward

    assert rel(official_forward(str(tmp_path / "merged"), batch)["logits"], want) <= 1e-4


@pytest.mark.slow
def test_default_experiment_on_an_nf4_base_ends_within_a_few_points_of_the_full_precision_run(tmp_path):
    """The acceptance run at full length (400 steps, ~1-2 min on 2 CPU cores each)."""
    results = {q: train(compose_cfg(f"model.quantize={q}", "trainer.progress_bar=false"), tmp_path / q) for q in
               ("none", "nf4")}  # fmt: skip
    acc = {q: r.eval_after["eval/accuracy"] for q, r in results.items()}
    assert acc["nf4"] >= acc["none"] - 0.05 and results["nf4"].eval_before["eval/accuracy"] < acc["nf4"] - 0.5
    assert math.isfinite(results["nf4"].eval_after["eval/loss"])


# ------------------------------------------------------------------------------------------ full size, on the CPU
LOAD_AND_MEASURE = """
import json, sys, torch
from deepseek_vl2_lora.model import DeepseekVL2ForCausalLM
from deepseek_vl2_lora.model.quant import quantized_bytes
from deepseek_vl2_lora.training.metrics import peak_rss_bytes

def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

before = rss()
model = DeepseekVL2ForCausalLM.from_pretrained(sys.argv[1], torch_dtype=torch.bfloat16, quantize="nf4")
peak = peak_rss_bytes()
size = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
print(json.dumps({"before": before, "peak": peak, "model": size, "quantized": quantized_bytes(model)}))
"""


@pytest.mark.slow
def test_full_size_vl2_tiny_loads_quantized_within_a_shard_plus_the_quantized_model_plus_1_gib(tmp_path):
    """The released VL2-Tiny (3.37B parameters, 6.7 GB in bf16) with random weights in 1 GiB shards (the release is
    one 6.7 GB file; smaller shards make the bound tighter than the model itself): loading it with nf4 grows the
    process's resident memory (its peak, VmHWM) by at most the largest shard + the loaded model + 1 GiB; a
    loader holding the bf16 weights whole would need 6.7 GB + the model."""
    ckpt = make_released_random_checkpoint(tmp_path / "tiny", "deepseek-vl2-tiny", max_shard_size=2**30, device="cpu")
    shards = sorted(ckpt.glob("*.safetensors"))
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_AND_MEASURE, str(tmp_path / "tiny")], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    largest = max(s.stat().st_size for s in shards)
    growth = m["peak"] - m["before"]
    print(
        f"peak RSS growth {growth / 2**30:.2f} GiB; largest shard {largest / 2**30:.2f} GiB, loaded model "
        f"{m['model'] / 2**30:.2f} GiB (quantized weights {m['quantized'][0] / 2**30:.2f} GiB, "
        f"{m['quantized'][1] / 2**30:.2f} GiB in bf16)"
    )
    assert growth <= largest + m["model"] + 2**30
    assert m["model"] + sum(s.stat().st_size for s in shards) > growth + 2**30  # the bound means something
