"""End to end at VL2-Tiny's real shapes, as a user runs it: `train.py` on random weights in the official layout
(deepseek_vl2_lora.model.tiny.make_released_random_checkpoint: the shipped config and processor files, bf16 shards),
data/demo packed to 4096-token rows, bf16 with the fast kernels; DeepSpeed ZeRO-2 under its launcher with one
rank; `scripts/chat.py` answering one turn from the trained run.

On CUDA (marked `gpu`): the whole model (12 LM layers, the 27-layer SigLIP tower), 30 steps, and 10 under DeepSpeed.
On the CPU (marked `slow`): the same commands at real width with 2 LM layers (one dense, one MoE) and 1 vision
layer, in bf16 autocast, a few steps; flash_attention_2 has no CPU kernel, sdpa stands in (the same per-sample
calls on packed rows); DeepSpeed runs its CPU accelerator over gloo. `scripts/gpu_session.sh --dry-run e2e` runs
these."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deepseek_vl2_lora.training.dist_env import free_port
from deepseek_vl2_lora.training.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
DEVICES = [pytest.param("cuda", marks=pytest.mark.gpu), pytest.param("cpu", marks=pytest.mark.slow)]
SIZE = {  # layers (None: the released depth), steps, DeepSpeed steps, micro batch, eval samples
    "cuda": dict(layers=None, vision_layers=None, steps=30, ds_steps=10, micro=16, eval_limit=8),
    "cpu": dict(layers=2, vision_layers=1, steps=6, ds_steps=2, micro=2, eval_limit=2),
}
_made: dict = {}


def _env(device: str, tmp: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", "DEEPSEEK_VL2_LORA_CACHE": str(tmp)}
    if device == "cpu":  # DeepSpeed's CPU accelerator, gloo; no GPU even where one is visible
        env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=str(os.cpu_count() or 1))
    return env


def _run(cmd: list[str], env: dict, log: Path, timeout: int) -> str:
    with open(log, "w") as out:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
    text = log.read_text()
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{text[-5000:]}"
    return text


def _checkpoint(device: str, tmp_path_factory) -> Path:
    """The random VL2-Tiny checkpoint for `device`'s size, written once per session."""
    if device not in _made:
        from deepseek_vl2_lora.model.tiny import make_released_random_checkpoint

        size = SIZE[device]
        out = tmp_path_factory.mktemp("vl2_tiny_random") / "deepseek-vl2-tiny"
        _made[device] = make_released_random_checkpoint(out, "deepseek-vl2-tiny", size["layers"], size["vision_layers"])
    return _made[device]


def _overrides(device: str, ckpt: Path, steps: int) -> list[str]:
    size = SIZE[device]
    return [
        "experiment=vl2_tiny",
        f"model.path={ckpt}",
        "logger=jsonl",
        "trainer.precision=bf16",
        "model.dtype=bfloat16",
        "model.experts_kernel=grouped",
        f"model.attn_implementation={'flash_attention_2' if device == 'cuda' else 'sdpa'}",
        f"trainer.device={device}",
        "trainer.pack_length=4096",
        f"trainer.micro_batch_size={size['micro']}",
        "trainer.grad_accum=1",
        f"trainer.max_steps={steps}",
        "trainer.eval_before=false",
        "trainer.eval_every=0",
        "trainer.save_every=0",
        f"data.eval_limit={size['eval_limit']}",
        "trainer.eval_batch_size=8",
        "trainer.eval_max_new_tokens=4",
        "trainer.print_every=1",
        "trainer.progress_bar=false",
        "optim.lr=1e-3",
        "optim.warmup_steps=2",
    ]


def _train_single(device: str, tmp_path_factory) -> Path:
    """The single-process run (cached per session: chat.py reads its trained state)."""
    key = ("run", device)
    if key not in _made:
        ckpt = _checkpoint(device, tmp_path_factory)
        run_dir = tmp_path_factory.mktemp("e2e_train")
        cmd = [sys.executable, "train.py", f"hydra.run.dir={run_dir}", *_overrides(device, ckpt, SIZE[device]["steps"])]
        cmd.append("trainer.gradient_checkpointing=false")
        _run(cmd, _env(device, run_dir), run_dir / "console.log", timeout=1200)
        _made[key] = run_dir
    return _made[key]


def _check_steps(run_dir: Path, steps: int, device: str) -> list[dict]:
    records = read_metrics(run_dir, "train")
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    for r in records:
        assert math.isfinite(r["train/loss"]) and r["train/skipped"] == 0, r
        assert r["perf/tokens_per_s"] > 0
        if device == "cuda":
            assert r["perf/mfu"] > 0 and r["mem/peak_allocated_gb"] > 0, r
        else:
            assert r["perf/mfu"] is None and r["mem/peak_rss_gb"] > 0, r
    last = records[-1]
    print(json.dumps({k: last.get(k) for k in ("train/loss", "perf/tokens_per_s", "perf/mfu", "perf/tflops_per_s")}))
    print(json.dumps({k: v for k, v in last.items() if k.startswith("mem/")}))
    return records


@pytest.mark.parametrize("device", DEVICES)
def test_train_py_on_full_size_vl2_tiny_random_weights(device, tmp_path_factory):
    run_dir = _train_single(device, tmp_path_factory)
    records = _check_steps(run_dir, SIZE[device]["steps"], device)
    losses = [r["train/loss"] for r in records]
    k = max(1, len(losses) // 5)
    print("losses", [round(x, 4) for x in losses])
    assert sum(losses[-k:]) / k < sum(losses[:k]) / k  # the loss falls
    assert records[0]["train/samples"] == SIZE[device]["micro"]
    assert (run_dir / "trained" / "adapter_model.safetensors").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == SIZE[device]["steps"] and math.isfinite(summary["eval_after"]["eval/loss"])


@pytest.mark.parametrize("device", DEVICES)
def test_deepspeed_zero2_one_rank_under_the_launcher(device, tmp_path_factory):
    ckpt = _checkpoint(device, tmp_path_factory)
    run_dir = tmp_path_factory.mktemp("e2e_zero2")
    steps = SIZE[device]["ds_steps"]
    cmd = ["scripts/launch_single_node.sh", "1", str(run_dir), "dist=zero2", *_overrides(device, ckpt, steps)]
    cmd.append("trainer.gradient_checkpointing=true")
    env = {**_env(device, run_dir), "MASTER_PORT": str(free_port())}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this Python's `deepspeed`
    _run(cmd, env, run_dir / "console.log", timeout=1200)
    _check_steps(run_dir, steps, device)
    assert (run_dir / "trained" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("device", DEVICES)
def test_chat_answers_one_turn_from_the_trained_run(device, tmp_path_factory):
    run_dir = _train_single(device, tmp_path_factory)
    cmd = [
        sys.executable, "scripts/chat.py", str(run_dir), "--device", device, "--max-new-tokens", "8",
        "--image", "data/demo/images/eval_0000.png", "--prompt", "<image>\nWhat colour is the shape?",
    ]  # fmt: skip
    text = _run(cmd, _env(device, run_dir), run_dir / "chat.log", timeout=600)
    print(text[-2000:])
    assert "Traceback" not in text
