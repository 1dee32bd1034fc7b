"""DeepSpeed ZeRO-2/3 with the real `deepspeed` launcher, on CPU ranks that talk over gloo (docs/deepspeed.md).

What "the same run" means: 2 ranks × micro batch m read, between them, exactly the samples of 1 rank × micro batch
2m (data.sampling.EpochBatchSampler); each rank weights its mean token loss by its share of the global micro batch's
supervised tokens (trainer._sync_micro_batch), so the LM objective is the same function of the same weights. The
MoE load-balancing (aux) loss, as in the official model, averages over padded positions too; the collator pads a
micro batch to its longest sample, so 2 ranks padding m samples each are not 1 rank padding 2m, and the aux term
and its gradient (× aux_loss_alpha = 1e-3) differ slightly: with Adam's normalised updates the trajectories then
drift apart (measured on the default run: 1e-3 relative after 3 steps at the full lr, ≤ 2 % over 400 steps).
`dist.global_padding=true` pads every rank to the longest sample across ranks, as one process pads; with it the
runs below are the same computation, and what differs is float32 summation order only (per-rank partial sums,
DeepSpeed's flat gradient buffers, its all-reduce). Hence the tolerance: rtol 1e-5 on losses and gradient norms
(float32 eps 6e-8 times a few hundred accumulated roundings; measured ≤ 5e-7 over 200 steps of the default run),
token counts, sample counts, epochs and learning rates exactly equal. The failing-rank test, run with the default
per-rank padding, checks the one thing padding cannot change: step 1's LM loss (same weights, same tokens).

Each launch costs ~12-20 s on 2 shared cores (2 processes importing torch and deepspeed, 1 thread each).
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_fault_tolerance import events, wait_for_step
from test_train_config import compose_cfg

from deepseek_vl2_lora.data.sampling import EpochBatchSampler, batches_per_epoch, epoch_order
from deepseek_vl2_lora.model.tiny import ensure_tiny_checkpoint
from deepseek_vl2_lora.training import train
from deepseek_vl2_lora.training.config import OptimConfig
from deepseek_vl2_lora.training.deepspeed_engine import deepspeed_config
from deepseek_vl2_lora.training.dist_env import DistEnv, EngineError, free_port
from deepseek_vl2_lora.training.engine import SingleProcessEngine
from deepseek_vl2_lora.training.loop import FAULT_ENV
from deepseek_vl2_lora.training.manifest import verify_manifest
from deepseek_vl2_lora.training.metrics import read_metrics
from deepseek_vl2_lora.training.preemption import PREEMPTED_EXIT
from deepseek_vl2_lora.training.run_lock import LOCK_FILE
from deepseek_vl2_lora.training.train_state import (
    CHECKPOINTS,
    ResumeError,
    TrainState,
    load_checkpoint,
    save_checkpoint,
    step_dir_name,
)

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's `deepspeed` launcher
needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="DeepSpeed is not installed: pip install --no-build-isolation 'deepspeed>=0.16'",
)

MICRO = 2  # per rank; the one-rank reference runs 2 × MICRO
STEPS = 6
ARGS = [
    "experiment=smoke",  # 16 demo records (2 epochs of 4 global batches of 4), eval on 4 records
    "trainer.device=cpu",
    "trainer.cpu_threads=1",
    "trainer.grad_accum=2",
    f"trainer.max_steps={STEPS}",
    "optim.warmup_steps=0",  # the full lr from step 1: the weights move
    "trainer.save_every=3",
    "trainer.keep_last=2",
    "data.eval_limit=5",  # eval batches of 1 split over 2 ranks: 3 and 2, rank 1 runs a padding batch
    "trainer.eval_batch_size=1",
    "trainer.eval_max_new_tokens=2",
]
BENCH = "trainer.eval_benchmarks=[{path:data/demo/bench_vqa.tsv,limit:3}]"  # split over the ranks too
SAME = "dist.global_padding=true"  # see the module docstring
EXACT = ("train/tokens", "train/samples", "train/epoch", "train/lr")
RTOL = 1e-5


# ------------------------------------------------------------------------------------------------ launching
@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    """The session's tiny-checkpoint cache, with the default model generated here, before ranks race to do it."""
    root = tmp_path_factory.getbasetemp() / "tiny_cache"
    model = compose_cfg().model
    ensure_tiny_checkpoint(model.tiny_family, model.tiny_seed, root=root)
    return root


def _env(tiny_root: Path, **extra) -> dict:
    env = {
        **os.environ,
        "DEEPSEEK_VL2_LORA_CACHE": str(tiny_root),
        "WANDB_MODE": "disabled",
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",  # CPU ranks over gloo even where a GPU is visible
        "CUDA_VISIBLE_DEVICES": "",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(ROOT),
        "MASTER_PORT": str(free_port()),
        **extra,
    }
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", FAULT_ENV):
        if key not in extra:
            env.pop(key, None)
    return env


def _run(cmd: list[str], env: dict, log: Path, timeout: int = 300) -> tuple[int, str, float]:
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
    return proc.returncode, log.read_text(), time.monotonic() - start


def single(run_dir: Path, tiny_root: Path, *extra: str) -> Path:
    """The one-process reference: dist=single, micro batch 2 × MICRO."""
    cmd = [sys.executable, "train.py", f"hydra.run.dir={run_dir}", *ARGS, f"trainer.micro_batch_size={2 * MICRO}"]
    rc, out, _ = _run([*cmd, *extra], _env(tiny_root), run_dir.with_suffix(".out"))
    assert rc == 0, out[-4000:]
    return run_dir


def two_ranks_cmd(run_dir: Path, dist: str, *extra: str) -> list[str]:
    """README's one-node command (scripts/launch_single_node.sh) with 2 CPU ranks."""
    return [
        "scripts/launch_single_node.sh",
        "2",
        str(run_dir),
        f"dist={dist}",
        *ARGS,
        f"trainer.micro_batch_size={MICRO}",
        *extra,
    ]


def two_ranks(run_dir: Path, tiny_root: Path, dist: str, *extra: str, **env: str) -> Path:
    """two_ranks_cmd, run to a successful end (`env`: extra variables)."""
    rc, out, _ = _run(two_ranks_cmd(run_dir, dist, *extra), _env(tiny_root, **env), run_dir.with_suffix(".out"))
    assert rc == 0, out[-4000:]
    return run_dir


def curve(run_dir: Path) -> list[dict]:
    return read_metrics(run_dir, "train")


def assert_same_curve(expected: list[dict], got: list[dict], rtol: float = RTOL, aux_rtol: float = RTOL) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in expected] == list(range(1, STEPS + 1))
    for e, g in zip(expected, got):
        for key in EXACT:
            assert g[key] == e[key], (e["step"], key, e[key], g[key])
        for key, tol in (("train/loss", rtol), ("train/grad_norm", rtol), ("train/aux_loss", aux_rtol)):
            assert g[key] == pytest.approx(e[key], rel=tol, abs=1e-9), (e["step"], key, e[key], g[key])
        assert g["train/skipped"] == 0


def assert_same_trained(a: Path, b: Path, atol: float) -> None:
    x, y = (load_file(r / "trained" / "adapter_model.safetensors") for r in (a, b))  # LoRA and modules_to_save
    assert x.keys() == y.keys() and x
    for k in x:
        torch.testing.assert_close(y[k], x[k], rtol=0, atol=atol, msg=k)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_root) -> Path:
    return single(tmp_path_factory.mktemp("ref") / "run", tiny_root, BENCH)


@pytest.fixture(scope="module")
def zero2(tmp_path_factory, tiny_root) -> Path:
    return two_ranks(tmp_path_factory.mktemp("zero2") / "run", tiny_root, "zero2", SAME)


@pytest.fixture(scope="module")
def zero3(tmp_path_factory, tiny_root) -> Path:
    return two_ranks(tmp_path_factory.mktemp("zero3") / "run", tiny_root, "zero3", SAME, BENCH)


# ------------------------------------------------------------------------------------------------ equality
@needs_deepspeed
def test_zero2_two_ranks_match_one_rank(reference, zero2):
    assert_same_curve(curve(reference), curve(zero2))
    before, after = read_metrics(zero2, "eval")  # eval ran on every rank; rank 0 logged it, once
    ref_before, ref_after = read_metrics(reference, "eval")
    assert before["eval/loss"] == pytest.approx(ref_before["eval/loss"], rel=1e-6)
    assert after["eval/loss"] == pytest.approx(ref_after["eval/loss"], rel=RTOL)
    assert after["eval/accuracy"] == ref_after["eval/accuracy"]
    assert_same_trained(reference, zero2, atol=1e-5)
    # Rank 0 alone writes reports; every rank logs to its own file.
    assert (zero2 / "logs" / "rank0.log").is_file() and (zero2 / "logs" / "rank1.log").is_file()
    assert "eval (after" in (zero2 / "logs" / "rank1.log").read_text()
    # A checkpoint: the trainable tensors only, DeepSpeed's per-rank optimizer shards, one RNG file per rank.
    ckpt = zero2 / CHECKPOINTS / f"step_{STEPS:08d}"
    state = json.loads((ckpt / "state.json").read_text())
    assert (state["world_size"], state["dist"]) == (2, "zero2")
    trainable = load_file(ckpt / "trainable.safetensors")  # the same tensors as one process saves: no frozen ones
    assert trainable.keys() == load_file(reference / CHECKPOINTS / ckpt.name / "trainable.safetensors").keys()
    report = json.loads((zero2 / "trainable_parameters.json").read_text())
    assert sum(t.numel() for t in trainable.values()) == report["trainable_params"] < report["total_params"]
    shards = sorted(p.name for p in (ckpt / "deepspeed").iterdir() if "optim_states" in p.name)
    assert len(shards) == 2, shards
    assert (ckpt / "rng.pt").is_file() and (ckpt / "rng_rank1.pt").is_file()


def same_eval_before(a: Path, b: Path) -> None:
    """The untrained model's eval (the same weights): the same predictions and every metric, exactly."""
    (before, *_), (ref_before, *_) = read_metrics(a, "eval"), read_metrics(b, "eval")
    assert before == ref_before
    predictions = sorted(b.glob("eval/**/step_00000000.jsonl"))
    assert predictions
    for path in predictions:
        assert (a / path.relative_to(b)).read_text() == path.read_text(), path


@needs_deepspeed
@pytest.mark.slow
def test_zero2_on_a_quantized_base_matches_one_rank(tmp_path, tiny_root):
    """model.quantize=nf4: the quantized weights are buffers, replicated on every rank (DeepSpeed's bf16/fp32 casts
    leave their codes and scales alone); training state sharded as usual. Same run as one process."""
    quantized = "model.quantize=nf4"
    reference = single(tmp_path / "single", tiny_root, quantized)
    zero2 = two_ranks(tmp_path / "zero2", tiny_root, "zero2", SAME, quantized)
    assert_same_curve(curve(reference), curve(zero2))
    # The gradients are summed in another order on two ranks; through the 4-bit base's dequantized matmuls that
    # moved a q_a_proj weight by 1.3e-5 after 4 steps (Adam scales small gradients' noise up). A rank training
    # on other base weights or another shard is off by about one step, lr = 3e-3.
    assert_same_trained(reference, zero2, atol=5e-5)
    assert "quantized base (model.quantize=nf4)" in (tmp_path / "zero2" / "logs" / "rank1.log").read_text()


@needs_deepspeed
def test_zero3_two_ranks_match_one_rank(reference, zero3):
    """ZeRO-3: evaluation split over the ranks (every forward on both: rank 1 runs a padding batch) gives the
    one-process predictions and metrics."""
    assert_same_curve(curve(reference), curve(zero3))
    same_eval_before(zero3, reference)
    (_, after), (_, ref_after) = read_metrics(zero3, "eval"), read_metrics(reference, "eval")
    assert after["eval/loss"] == pytest.approx(ref_after["eval/loss"], rel=RTOL)  # generation under ZeRO-3 too
    assert after["eval/accuracy"] == ref_after["eval/accuracy"]
    assert_same_trained(reference, zero3, atol=1e-5)  # gathered from the sharded fp32 master copies


@needs_deepspeed
def test_packed_rows_on_two_ranks(reference, tmp_path, tiny_root):
    """trainer.pack_length under ZeRO-2: each rank packs its share (global padding pads segment_ids too). The
    first step's LM loss is the one-process unpacked one; later steps differ only through the MoE aux loss,
    which balances over rows."""
    packed = two_ranks(tmp_path / "packed", tiny_root, "zero2", SAME, "trainer.pack_length=4096")
    got, expected = curve(packed), curve(reference)
    assert len(got) == STEPS
    assert got[0]["train/loss"] == pytest.approx(expected[0]["train/loss"], rel=RTOL)
    for g, e in zip(got, expected):
        assert [g[k] for k in EXACT] == [e[k] for k in EXACT]
        assert g["train/loss"] == pytest.approx(e["train/loss"], rel=1e-2)


@needs_deepspeed
def test_token_budget_and_eval_split_on_two_ranks(reference, tmp_path, tiny_root, monkeypatch):
    """2 ranks × data.tokens_per_micro_batch=128 under ZeRO-2 against one process with a 256-token budget (one
    step, in this process): the same rows make the first global micro batch, so the first step's LM loss, tokens
    and samples are the one-process ones. Eval split over the ranks, the eval split and a benchmark alike, gives
    the one-process predictions and every metric (the reference run's; the untrained model: the same weights)."""
    extra = ["trainer.pack_length=128", "trainer.grad_accum=1", "trainer.save_every=0", "trainer.max_steps=1"]
    run = two_ranks(tmp_path / "two", tiny_root, "zero2", *extra, BENCH, "data.tokens_per_micro_batch=128")
    same_eval_before(run, reference)
    monkeypatch.setenv("DEEPSEEK_VL2_LORA_CACHE", str(tiny_root))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    one = ["data.tokens_per_micro_batch=256", "data.eval_path=null"]
    train(compose_cfg(*ARGS, *extra, *one), tmp_path / "one")
    got, expected = curve(run)[0], read_metrics(tmp_path / "one", "train")[0]
    assert got["train/loss"] == pytest.approx(expected["train/loss"], rel=1e-6)
    assert (got["train/tokens"], got["train/samples"]) == (expected["train/tokens"], expected["train/samples"])


# ------------------------------------------------------------------------------------------------ resume
def _resume_is_exact(run: Path, tmp_path: Path, tiny_root: Path, dist: str) -> None:
    start = run / CHECKPOINTS / "step_00000003"
    resumed = two_ranks(tmp_path / "resumed", tiny_root, dist, SAME, f"trainer.resume={start}")
    got, expected = curve(resumed), [r for r in curve(run) if r["step"] > 3]
    keys = ("step", "train/loss", "train/aux_loss", "train/grad_norm", *EXACT)
    assert [{k: r[k] for k in keys} for r in got] == [{k: r[k] for k in keys} for r in expected]  # bit for bit
    assert_same_trained(run, resumed, atol=0)


@needs_deepspeed
def test_zero2_resume_same_world_size_is_exact(zero2, tmp_path, tiny_root):
    _resume_is_exact(zero2, tmp_path, tiny_root, "zero2")


@needs_deepspeed
@pytest.mark.slow
def test_zero3_resume_same_world_size_is_exact(zero3, tmp_path, tiny_root):
    _resume_is_exact(zero3, tmp_path, tiny_root, "zero3")


def test_resume_with_another_layout_fails_clearly(tmp_path):
    """A checkpoint records the dist kind and world size that wrote it; another layout is a clear error."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    groups = [{"name": "all", "params": list(model.parameters()), "lr": 0.1, "weight_decay": 0.0}]
    engine = SingleProcessEngine(model, groups, OptimConfig(), max_steps=10, env=DistEnv())
    state = TrainState(step=3, num_samples=8, batch_size=1, world_size=2, dist="zero2")
    path = save_checkpoint(tmp_path, state, dict(model.named_parameters()), engine, keep_last=0)
    with pytest.raises(ResumeError, match=r"dist=zero2 with 2 rank\(s\); this run is dist=single with 1"):
        load_checkpoint(path, engine, lambda tensors, source: None)


# ------------------------------------------------------------------------------------------------ launchers
@needs_deepspeed
def test_two_nodes_over_loopback(tmp_path, tiny_root, reference):
    """scripts/launch_node.sh on 2 simulated nodes: two launchers (--no_ssh, node ranks 0 and 1, master 127.0.0.1,
    1 rank each) make one 2-rank job."""
    run_dir, env = tmp_path / "two_nodes", _env(tiny_root)
    args = [str(run_dir), "dist=zero2", SAME, *ARGS, f"trainer.micro_batch_size={MICRO}"]
    nodes = [
        subprocess.Popen(
            ["scripts/launch_node.sh", str(node), "2", "1", "127.0.0.1", *args],
            cwd=ROOT,
            env=env,
            stdout=open(tmp_path / f"node{node}.out", "w"),
            stderr=subprocess.STDOUT,
        )
        for node in (0, 1)
    ]
    codes = [p.wait(timeout=300) for p in nodes]
    assert codes == [0, 0], "\n".join((tmp_path / f"node{n}.out").read_text()[-3000:] for n in (0, 1))
    assert_same_curve(curve(reference), curve(run_dir))
    assert sorted(p.name for p in (run_dir / "logs").glob("rank*.log")) == ["rank0.log", "rank1.log"]


# srun on one machine: the per-node command once per node (SLURM_NODEID 0 .. SLURM_NNODES-1), each in a session of
# its own; a signal to srun goes to every process of every node, as slurmstepd delivers it to a step's processes.
STUB_SRUN = """#!/usr/bin/env bash
while [[ $1 == -* ]]; do shift; done
pids=()
for ((n = 0; n < SLURM_NNODES; n++)); do SLURM_NODEID=$n setsid "$@" & pids+=($!); done
forward() { for p in "${pids[@]}"; do kill -s "$1" -- "-$p" 2>/dev/null; done; }
trap 'forward USR1' USR1
trap 'forward TERM' TERM
rc=0
for p in "${pids[@]}"; do
    while :; do wait "$p" && r=0 || r=$?; kill -0 "$p" 2>/dev/null || break; done
    wait "$p" && r=0 || r=$?
    rc=$((rc | r))
done
exit $rc
"""
# scontrol: every node is this machine; `scontrol requeue JOB` is written to bin/requeued.
STUB_SCONTROL = """#!/bin/sh
case "$1" in
    show) echo 127.0.0.1; echo 127.0.0.1 ;;
    requeue) echo "requeue $2" >> "$(dirname "$0")/requeued" ;;
esac
"""


def _slurm_env(tmp_path: Path, tiny_root: Path, run_dir: Path, **extra: str) -> dict:
    """The environment SLURM gives scripts/slurm_train.sbatch, with stub `srun` and `scontrol` in tmp_path/bin."""
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    for name, text in (("srun", STUB_SRUN), ("scontrol", STUB_SCONTROL)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    return _env(
        tiny_root,
        PATH=f"{stubs}{os.pathsep}{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        SLURM_SUBMIT_DIR=str(ROOT),
        SLURM_JOB_NAME="test",
        SLURM_JOB_ID="1",
        SLURM_JOB_NODELIST="node[0-1]",
        RUN_DIR=str(run_dir),
        **extra,
    )


@needs_deepspeed
@pytest.mark.slow
def test_slurm_script_with_a_stub_srun(tmp_path, tiny_root, reference):
    """scripts/slurm_train.sbatch as SLURM would run it on 2 nodes, with `srun` and `scontrol` replaced by stubs that
    start the per-node command twice on this machine (SLURM_NODEID 0 and 1)."""
    run_dir = tmp_path / "run"
    env = _slurm_env(tmp_path, tiny_root, run_dir, SLURM_NNODES="2", GPUS_PER_NODE="1")
    cmd = ["scripts/slurm_train.sbatch", "dist=zero3", SAME, *ARGS, f"trainer.micro_batch_size={MICRO}"]
    rc, out, _ = _run(cmd, env, tmp_path / "slurm.out")
    assert rc == 0, out[-4000:]
    assert_same_curve(curve(reference), curve(run_dir))


@needs_deepspeed
def test_a_failing_rank_ends_the_job_fast(tmp_path, tiny_root, reference):
    """Rank 1 raises at step 2 (the FAULT_ENV test hook): the launcher must stop rank 0 too and exit non-zero
    with rank 1's error, not hang in a collective. (Its step 1 also shows what per-rank padding changes.)"""
    run_dir = tmp_path / "run"
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "--no_local_rank", "train.py"]
    cmd += [f"hydra.run.dir={run_dir}", "dist=zero2", *ARGS, f"trainer.micro_batch_size={MICRO}"]
    rc, out, seconds = _run(cmd, _env(tiny_root, **{FAULT_ENV: "1:2:raise"}), tmp_path / "run.out", timeout=240)
    assert rc != 0
    assert "injected failure (DEEPSEEK_VL2_LORA_FAULT) on rank 1 at step 2" in out
    assert seconds < 120, f"took {seconds:.0f} s"  # ~15-20 s of startup and one step; a hang would be minutes
    (step1,) = read_metrics(run_dir, "train")  # rank 0 got no further than step 1
    expected = curve(reference)[0]
    assert step1["train/loss"] == pytest.approx(expected["train/loss"], rel=1e-6)  # the LM loss ignores padding
    assert step1["train/aux_loss"] == pytest.approx(expected["train/aux_loss"], rel=2e-2)  # the aux loss does not
    assert "injected failure" in (run_dir / "logs" / "rank1.log").read_text()


def _adam_steps(checkpoint: Path) -> set[int]:
    """AdamW's step count in rank 0's DeepSpeed optimizer shard of a checkpoint (updates applied so far)."""
    (shard,) = (checkpoint / "deepspeed").glob("zero_pp_rank_0_*optim_states.pt")
    state = torch.load(shard, map_location="cpu", weights_only=False)["optimizer_state_dict"]
    base = state.get("base_optimizer_state") or state["optimizer_state_dict"]  # ZeRO-2 / ZeRO-3 layouts
    return {int(s["step"]) for s in base["state"].values()}


@needs_deepspeed
@pytest.mark.parametrize("dist", ["zero2", pytest.param("zero3", marks=pytest.mark.slow)])
def test_a_nan_on_one_rank_skips_the_update_on_every_rank(tmp_path, tiny_root, dist):
    """Rank 1's LM loss is NaN in step 2 (FAULT_ENV): no rank updates (DeepSpeed's optimizer sees a non-finite
    gradient norm), the lr schedule moves on, the step is logged as skipped and no checkpoint is written for it."""
    overrides = ["trainer.max_steps=4", "trainer.save_every=1", "trainer.keep_last=10", "data.eval_path=null"]
    run_dir = two_ranks(tmp_path / "run", tiny_root, dist, *overrides, **{FAULT_ENV: "1:2:nan"})
    records = read_metrics(run_dir, "train")
    assert [r["train/skipped"] for r in records] == [0, 1, 0, 0]
    assert records[1]["train/loss"] == "nan" and records[1]["train/grad_norm"] == "inf"
    lrs = [r["train/lr"] for r in records]  # cosine decay: one schedule step per step, the skipped one included
    assert lrs == sorted(lrs, reverse=True) and len(set(lrs)) == 4
    saved = {p.name: p for p in (run_dir / CHECKPOINTS).glob("step_*")}
    assert sorted(saved) == ["step_00000001", "step_00000003", "step_00000004"]
    assert [_adam_steps(saved[f"step_0000000{s}"]) for s in (1, 3, 4)] == [{1}, {2}, {3}]


# ------------------------------------------------------------------------------------------------ preemption
LONG = ["trainer.max_steps=14", "trainer.save_every=0"]  # enough steps to signal at a random one; no periodic saves


@pytest.fixture(scope="module")
def zero2_long(tmp_path_factory, tiny_root) -> Path:
    """An uninterrupted 2-rank ZeRO-2 run of LONG, the reference for the preempted ones."""
    return two_ranks(tmp_path_factory.mktemp("zero2_long") / "run", tiny_root, "zero2", SAME, *LONG)


def _assert_preempted_on_both_ranks(run_dir: Path, at: int, sig: str) -> int:
    """The `preempted` event at a step >= at, its checkpoint with both ranks' files and a manifest that verifies;
    returns the step."""
    text = run_dir.with_suffix(".out").read_text()
    assert "Traceback" not in text, text[-4000:]
    (event,) = events(run_dir, "preempted")
    assert at <= event["step"] < 14 and event["signal"] == sig
    ckpt = run_dir / CHECKPOINTS / step_dir_name(event["step"])
    assert event["checkpoint"] == str(ckpt) and verify_manifest(ckpt) == []
    assert (ckpt / "rng.pt").is_file() and (ckpt / "rng_rank1.pt").is_file()
    assert len(list((ckpt / "deepspeed").glob("*optim_states.pt"))) == 2
    assert not (run_dir / LOCK_FILE).exists()
    return event["step"]


def _assert_resumed_exactly(run_dir: Path, reference: Path, stopped: int) -> None:
    assert events(run_dir, "resume")[-1]["step"] == stopped
    keys = ("step", "train/loss", "train/aux_loss", "train/grad_norm", *EXACT)
    assert [{k: r[k] for k in keys} for r in curve(run_dir)] == [{k: r[k] for k in keys} for r in curve(reference)]
    assert_same_trained(reference, run_dir, atol=0)


@needs_deepspeed
def test_zero2_sigterm_to_the_job_checkpoints_every_rank_and_resumes_exactly(zero2_long, tmp_path, tiny_root):
    """SIGTERM to every process of the job (SLURM at the time limit, Ctrl-C in a terminal: the process group) at a
    seeded random step: the ranks agree on the step, save together and exit; the resumed run is bit for bit the
    uninterrupted one. DeepSpeed's launcher forwards the SIGTERM to its ranks (the same event: ignored), waits
    for them and exits 1: the ranks' own status, 75, shows with SIGUSR1 (the SLURM test below)."""
    at = random.Random(15).randint(2, 8)
    run_dir = tmp_path / "run"
    with open(run_dir.with_suffix(".out"), "w") as out:
        proc = subprocess.Popen(
            two_ranks_cmd(run_dir, "zero2", SAME, *LONG),
            cwd=ROOT,
            env=_env(tiny_root),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    wait_for_step(proc, run_dir, at)
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) in (1, PREEMPTED_EXIT), run_dir.with_suffix(".out").read_text()[-4000:]
    stopped = _assert_preempted_on_both_ranks(run_dir, at, "SIGTERM")
    two_ranks(run_dir, tiny_root, "zero2", SAME, *LONG, "trainer.resume=auto")
    _assert_resumed_exactly(run_dir, zero2_long, stopped)


@needs_deepspeed
def test_slurm_usr1_before_the_time_limit_checkpoints_requeues_and_resumes(zero2_long, tmp_path, tiny_root):
    """scripts/slurm_train.sbatch (1 node × 2 ranks, stub srun/scontrol) gets SIGUSR1 (`--signal=B:USR1@...`) at a
    seeded random step: it forwards it through srun to the ranks, which checkpoint and exit 75, and requeues the
    job. SLURM then runs the same script again (same job id, SLURM_RESTART_COUNT=1): it resumes by itself and the
    run is bit for bit the uninterrupted one."""
    at = random.Random(16).randint(2, 8)
    run_dir = tmp_path / "run"
    env = _slurm_env(tmp_path, tiny_root, run_dir, SLURM_NNODES="1", GPUS_PER_NODE="2")
    cmd = ["scripts/slurm_train.sbatch", "dist=zero2", SAME, *ARGS, f"trainer.micro_batch_size={MICRO}", *LONG]
    with open(run_dir.with_suffix(".out"), "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    wait_for_step(proc, run_dir, at)
    proc.send_signal(signal.SIGUSR1)  # to the batch script only, as --signal=B:USR1 does
    assert proc.wait(timeout=120) == 0, run_dir.with_suffix(".out").read_text()[-4000:]
    text = run_dir.with_suffix(".out").read_text()
    assert "preempted (exit status 75): requeueing job 1" in text
    assert (tmp_path / "bin" / "requeued").read_text() == "requeue 1\n"
    stopped = _assert_preempted_on_both_ranks(run_dir, at, "SIGUSR1")

    rc, out, _ = _run(cmd, {**env, "SLURM_RESTART_COUNT": "1"}, tmp_path / "requeued.out")
    assert rc == 0, out[-4000:]
    assert (tmp_path / "bin" / "requeued").read_text() == "requeue 1\n"  # done: not requeued again
    _assert_resumed_exactly(run_dir, zero2_long, stopped)


# ------------------------------------------------------------------------------------------------ pieces
def test_ranks_read_disjoint_interleaved_slices_of_each_global_batch():
    n, m, world = 22, 2, 3
    one = list(EpochBatchSampler(n, m * world, seed=4, epoch=1))
    per_rank = [list(EpochBatchSampler(n, m, seed=4, epoch=1, rank=r, world_size=world)) for r in range(world)]
    assert len(one) == batches_per_epoch(n, m * world) == 3 and all(len(b) == len(one) for b in per_rank)
    for b, batch in enumerate(one):
        slices = [per_rank[r][b] for r in range(world)]
        assert all(s == batch[r::world] for r, s in enumerate(slices))
        assert sorted(i for s in slices for i in s) == sorted(batch)  # disjoint, and together the global batch
    assert [i for b in one for i in b] == epoch_order(n, 4, 1)[:18]
    resumed = list(EpochBatchSampler(n, m, seed=4, epoch=1, start=2, rank=1, world_size=world))
    assert resumed == per_rank[1][2:]
    state = TrainState(num_samples=n, batch_size=m, world_size=world)
    state.advance(0, 2)  # the last whole global batch of the epoch
    assert (state.epoch, state.batch) == (1, 0)


def test_deepspeed_json_takes_its_auto_fields_from_the_hydra_config(tmp_path):
    cfg = compose_cfg(
        "dist=zero3", "trainer.micro_batch_size=3", "trainer.grad_accum=5", "optim.grad_clip=0.5", "trainer.device=cpu"
    )
    ds = deepspeed_config(cfg.dist, cfg.trainer, cfg.optim, "bf16", world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 5
    assert ds["train_batch_size"] == 3 * 5 * 4 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is True and ds["zero_optimization"]["stage"] == 3
    assert "optimizer" not in ds and "scheduler" not in ds
    assert deepspeed_config(cfg.dist, cfg.trainer, cfg.optim, "fp32", 1)["bf16"]["enabled"] is False
    assert (
        deepspeed_config(compose_cfg("dist=zero2").dist, cfg.trainer, cfg.optim, "fp32", 1)["zero_optimization"][
            "stage"
        ]
        == 2
    )

    custom = json.loads((ROOT / "deepseek_vl2_lora" / "configs" / "deepspeed" / "zero3.json").read_text())
    custom["train_micro_batch_size_per_gpu"] = 8  # disagrees with trainer.micro_batch_size=3
    custom["optimizer"] = {"type": "Adam"}
    (tmp_path / "custom.json").write_text(json.dumps(custom))
    cfg.dist.deepspeed_config = str(tmp_path / "custom.json")
    with pytest.raises(EngineError) as err:
        deepspeed_config(cfg.dist, cfg.trainer, cfg.optim, "fp32", 1)
    assert "train_micro_batch_size_per_gpu" in str(err.value) and '"optimizer"' in str(err.value)


# ------------------------------------------------------------------------------------------------ bad samples
@needs_deepspeed
def test_train_time_skips_are_counted_over_all_ranks(tmp_path, tiny_root):
    """Images damaged past their header pass the (header-only) start-up check and fail when encoded: each rank
    replaces its own bad samples, and data/skipped_at_train counts those of both ranks (each rank's log lists its
    own skips: the independent count)."""
    src = ROOT / "data" / "demo"
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    lines = (src / "train.jsonl").read_text().splitlines()[:16]
    for k, line in enumerate(lines):
        for image in json.loads(line)["images"]:
            raw = (src / image).read_bytes()
            (data / image).write_bytes(raw[: len(raw) // 2] if k % 3 == 0 else raw)  # 6 of 16 cut in half
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")
    overrides = [f"data.train_path={data / 'train.jsonl'}", "data.eval_path=null", "data.on_bad_sample=skip"]
    run_dir = two_ranks(tmp_path / "run", tiny_root, "zero2", *overrides)
    logged = [(run_dir / "logs" / f"rank{r}.log").read_text().count("skipped a bad training sample") for r in (0, 1)]
    final = read_metrics(run_dir, "train")[-1]["data/skipped_at_train"]
    assert logged[0] > 0 and logged[1] > 0 and final == sum(logged)
