"""The training loop end to end on the tiny random model (in-process `train(cfg, run_dir)`)."""

import json
import math

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from test_train_config import compose_cfg

from deepseek_vl2_lora.data import SFTDataset
from deepseek_vl2_lora.data.processor import DeepseekVL2Processor
from deepseek_vl2_lora.model import DeepseekVL2ForCausalLM
from deepseek_vl2_lora.policy.adapters import read_trained_state
from deepseek_vl2_lora.training import train
from deepseek_vl2_lora.training.config import ConfigError
from deepseek_vl2_lora.training.loop import NonFiniteError
from deepseek_vl2_lora.training.metrics import read_metrics
from deepseek_vl2_lora.training.preflight import resolve_data_file, resolve_model_dir
from deepseek_vl2_lora.training.train_state import ResumeError, list_checkpoints

TRAIN_KEYS = {
    "train/loss", "train/aux_loss", "train/objective", "train/grad_norm", "train/lr", "train/tokens",
    "train/samples", "train/padding", "train/skipped", "train/nonfinite_total", "perf/tokens_per_s",
    "perf/samples_per_s", "perf/mfu", "perf/step_time_s", "perf/tflops_per_s",
}  # fmt: skip


@pytest.fixture(autouse=True)
def tiny_cache(tmp_path_factory, monkeypatch):
    """One cache of generated tiny checkpoints for the whole session, outside the user's home."""
    root = tmp_path_factory.getbasetemp() / "tiny_cache"
    monkeypatch.setenv("DEEPSEEK_VL2_LORA_CACHE", str(root))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    return root


def run(run_dir, *overrides):
    cfg = compose_cfg("experiment=smoke", *overrides)
    return cfg, train(cfg, run_dir)


def expected_lr(cfg, step: int, group: str) -> float:
    """optim.lr × the group's lr_scale × warmup/cosine factor, written out independently of engine.lr_factor."""
    o, n = cfg.optim, cfg.trainer.max_steps
    s = step - 1  # the schedule is indexed by optimizer steps done before this one
    if s < o.warmup_steps:
        factor = (s + 1) / o.warmup_steps
    else:
        progress = (s - o.warmup_steps) / max(1, n - o.warmup_steps)
        factor = o.min_lr_ratio + (1 - o.min_lr_ratio) * (1 + math.cos(math.pi * progress)) / 2
    return o.lr * cfg.policy.groups[group.split("/")[0]].lr_scale * factor


def test_smoke_run(tmp_path):
    cfg, result = run(tmp_path, "optim.warmup_steps=2", "policy.groups.kv_low_rank.lr_scale=0.5")
    assert result.steps == 3
    records = read_metrics(tmp_path, "train")
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert TRAIN_KEYS <= r.keys()
        assert math.isfinite(r["train/loss"]) and r["train/aux_loss"] > 0  # full-noaux: MoE aux loss is on
        assert r["train/objective"] == pytest.approx(r["train/loss"] + r["train/aux_loss"])
        assert r["train/samples"] == cfg.trainer.micro_batch_size * cfg.trainer.grad_accum
        assert r["perf/tokens_per_s"] * r["perf/step_time_s"] == pytest.approx(r["train/tokens"])
        assert r["perf/mfu"] is None  # no peak FLOP/s on CPU
        assert r["train/grad_norm"] > 0 and r["train/skipped"] == 0
        lrs = {k.removeprefix("train/lr/"): v for k, v in r.items() if k.startswith("train/lr/")}
        assert {g.split("/")[0] for g in lrs} == {"q_low_rank", "kv_low_rank"}
        for group, lr in lrs.items():
            assert lr == pytest.approx(expected_lr(cfg, r["step"], group))

    # The trained state holds exactly the policy's trainable tensors, and each of them moved.
    trainable = json.loads((tmp_path / "trainable_parameters.json").read_text())["trainable_names"]
    assert trainable and all(("q_a_" in n or "q_b_" in n or "kv_a_" in n or "kv_b_" in n) for n in trainable)
    _, trained = read_trained_state(tmp_path / "trained")
    assert set(trained) == set(trainable)
    base = DeepseekVL2ForCausalLM.from_pretrained(resolve_model_dir(cfg.model)).state_dict()
    moved = [n for n in trained if not torch.equal(trained[n], base[n])]
    assert len(moved) == len(trained)

    # Eval before and after, on eval_limit samples; predictions written; resolved config saved.
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in ("eval_before", "eval_after"):
        assert 0.0 <= summary[key]["eval/accuracy"] <= 1.0 and summary[key]["eval/samples"] == 8
    assert summary["eval_after"]["eval/loss"] < summary["eval_before"]["eval/loss"]
    assert len((tmp_path / "eval" / "step_00000003.jsonl").read_text().splitlines()) == 8
    assert OmegaConf.load(tmp_path / "config_resolved.yaml") == OmegaConf.create(OmegaConf.to_container(cfg))


def test_each_sample_once_per_epoch(tmp_path):
    overrides = ["data.train_limit=16", "trainer.micro_batch_size=4", "trainer.grad_accum=2", "trainer.max_steps=4"]
    cfg, _ = run(tmp_path, *overrides, "trainer.eval_before=false", "data.eval_path=null")
    records = read_metrics(tmp_path, "train")
    processor = DeepseekVL2Processor.from_pretrained(resolve_model_dir(cfg.model))
    data = SFTDataset(resolve_data_file(cfg.data.train_path), processor)
    epoch_tokens = sum(len(data[i]["input_ids"]) for i in range(16))
    assert [r["train/samples"] for r in records] == [8, 8, 8, 8]
    assert records[0]["train/tokens"] + records[1]["train/tokens"] == epoch_tokens
    assert records[2]["train/tokens"] + records[3]["train/tokens"] == epoch_tokens
    assert [r["train/epoch"] for r in records] == [0.5, 1.0, 1.5, 2.0]


def test_same_losses_again_with_loader_workers_and_with_checkpointing(tmp_path):
    run(tmp_path / "a", "trainer.eval_before=false")
    run(tmp_path / "b", "trainer.eval_before=false", "data.num_workers=2")
    run(tmp_path / "c", "trainer.eval_before=false", "trainer.gradient_checkpointing=true")
    losses = [[r["train/loss"] for r in read_metrics(tmp_path / d, "train")] for d in "abc"]
    assert losses[0] == losses[1]
    assert losses[2] == pytest.approx(losses[0], rel=1e-5)


def inject_nan_loss(monkeypatch, bad_calls):
    """Make the LM loss NaN on the given training forward calls (1-based)."""
    original = DeepseekVL2ForCausalLM.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self.training and kwargs.get("labels") is not None:
            calls["n"] += 1
            if calls["n"] in bad_calls:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(DeepseekVL2ForCausalLM, "forward", forward)


def _adam_steps(checkpoint):
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)["optimizer"]["state"]
    return {int(s["step"]) for s in state.values()}


def test_nonfinite_step_is_skipped_and_never_checkpointed(tmp_path, monkeypatch):
    inject_nan_loss(monkeypatch, {2})
    _, result = run(tmp_path, "trainer.max_steps=4", "trainer.save_every=1", "trainer.keep_last=10")
    records = read_metrics(tmp_path, "train")
    assert [r["train/skipped"] for r in records] == [0, 1, 0, 0]
    assert [r["train/nonfinite_total"] for r in records] == [0, 1, 1, 1]
    assert records[1]["train/loss"] == "nan"
    assert result.nonfinite_skipped == 1
    saved = {p.name: p for p in list_checkpoints(tmp_path)}
    assert sorted(saved) == ["step_00000001", "step_00000003", "step_00000004"]
    events = [r for r in read_metrics(tmp_path, "event") if r["event"] == "checkpoint_skipped_nonfinite"]
    assert [e["step"] for e in events] == [2]
    # The skipped step did not update: three steps, two optimizer updates by step 3.
    assert _adam_steps(saved["step_00000001"]) == {1}
    assert _adam_steps(saved["step_00000003"]) == {2}
    for name, t in load_file(saved["step_00000004"] / "trainable.safetensors").items():
        assert torch.isfinite(t).all(), name


def test_consecutive_nonfinite_steps_stop_the_run(tmp_path, monkeypatch):
    inject_nan_loss(monkeypatch, set(range(2, 100)))
    with pytest.raises(NonFiniteError, match="3 consecutive steps") as err:
        run(tmp_path, "trainer.max_steps=10", "trainer.save_every=1", "trainer.max_consecutive_nonfinite=3")
    assert "step_00000001" in str(err.value)  # names the last good checkpoint
    assert [r["step"] for r in read_metrics(tmp_path, "train")] == [1, 2, 3, 4]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001"]
    assert read_metrics(tmp_path, "event")[-1] == {
        "step": 4,
        "kind": "event",
        "event": "stopped_nonfinite",
        "streak": 3,
    }


def test_wandb_offline_gets_resolved_config_and_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg, _ = run(tmp_path, "logger=wandb", "trainer.max_steps=2", "tags=[t1]", "logger.project=p")
    (wandb_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    (log,) = wandb_dir.glob("*.wandb")  # the offline run's record log (protobuf; config values are JSON)
    raw = log.read_bytes()
    assert b'{"max_steps":2,' in raw and b'["t1"]' in raw  # the resolved config ...
    assert b"${" not in raw  # ... with every interpolation resolved
    for key in (b"params/table", b"train/loss", b"train/aux_loss", b"eval/accuracy"):
        assert key in raw
    assert (tmp_path / "metrics.jsonl").exists()


def test_logger_none_writes_no_metrics_file(tmp_path):
    run(tmp_path, "logger=none", "trainer.max_steps=1", "trainer.eval_before=false")
    assert not (tmp_path / "metrics.jsonl").exists()
    assert (tmp_path / "summary.json").exists()


def test_bf16_weights_train_with_fp32_master_copies(tmp_path):
    """CUDA runs bf16 autocast over bf16 weights; the same code path runs on CPU under CPU autocast. The trained
    tensors stay float32 (master weights) while the frozen ones are stored in bf16."""
    overrides = ["model.dtype=bfloat16", "trainer.precision=bf16", "trainer.max_steps=2", "trainer.eval_before=false"]
    run(tmp_path, *overrides, "policy=mla_lowrank_lora")
    assert all(math.isfinite(r["train/loss"]) for r in read_metrics(tmp_path, "train"))
    tensors = load_file(tmp_path / "trained" / "adapter_model.safetensors")  # LoRA and modules_to_save
    assert tensors and {t.dtype for t in tensors.values()} == {torch.float32}


def test_resume_auto_without_checkpoint_starts_fresh(tmp_path, caplog):
    caplog.set_level("INFO", logger="deepseek_vl2_lora.training")
    _, result = run(tmp_path, "trainer.resume=auto", "trainer.max_steps=2", "trainer.eval_before=false")
    assert result.steps == 2 and "no checkpoint" in caplog.text
    assert not read_metrics(tmp_path, "event")


def test_resume_refuses_a_different_data_position(tmp_path):
    run(tmp_path, "trainer.max_steps=2", "trainer.save_every=2", "trainer.eval_before=false")
    with pytest.raises(ResumeError, match="micro batch 4"):
        run(tmp_path, "trainer.max_steps=4", "trainer.resume=auto", "trainer.micro_batch_size=2")


def _train_records(run_dir, *overrides):
    run(run_dir, "trainer.eval_before=false", "data.eval_path=null", "trainer.save_trained=false", *overrides)
    return read_metrics(run_dir, "train")


def test_packed_training_step_equals_unpacked(tmp_path):
    """trainer.pack_length: the micro batch's 4 samples in one row compute the unpacked step's LM loss (the
    first step; later steps differ through the MoE aux loss, which sees rows) over the same tokens and samples."""
    plain = _train_records(tmp_path / "plain", "trainer.max_steps=1")
    packed = _train_records(tmp_path / "packed", "trainer.max_steps=1", "trainer.pack_length=4096")
    assert packed[0]["train/loss"] == pytest.approx(plain[0]["train/loss"], rel=1e-5)
    assert packed[0]["train/samples"] == plain[0]["train/samples"] == 4
    assert packed[0]["train/tokens"] == plain[0]["train/tokens"]
    assert packed[0]["train/aux_loss"] != plain[0]["train/aux_loss"]  # rows, not samples: documented
    assert 0 <= packed[0]["train/padding"] < plain[0]["train/padding"]


@pytest.mark.slow
def test_compiled_blocks_train_like_eager(tmp_path):
    """trainer.compile_blocks=true (inductor) with packed rows: the same three steps as eager."""
    eager = _train_records(tmp_path / "eager", "trainer.pack_length=4096")
    compiled = _train_records(tmp_path / "compiled", "trainer.pack_length=4096", "trainer.compile_blocks=true")
    for a, b in zip(eager, compiled, strict=True):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-4)
        assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], rel=1e-3)


def test_epochs_decide_the_steps_and_resume_exactly(tmp_path, caplog):
    """trainer.epochs=2 on 20 samples, global batch 4, grad accum 2: 5 batches per epoch, ceil(2 × 5 / 2) = 5 steps
    (the smoke experiment's max_steps=3 is ignored); a run resumed from step 4 computes the same plan."""
    overrides = [
        "data.train_limit=20",
        "trainer.micro_batch_size=4",
        "trainer.grad_accum=2",
        "trainer.epochs=2",
        "trainer.eval_before=false",
        "data.eval_path=null",
        "trainer.save_every=2",
        "trainer.print_every=1",
        "trainer.peak_flops=1e12",
    ]
    with caplog.at_level("INFO", logger="deepseek_vl2_lora.training"):
        _, result = run(tmp_path / "a", *overrides)
    assert result.steps == 5
    records = read_metrics(tmp_path / "a", "train")
    assert [r["train/epoch"] for r in records] == [0.4, 0.8, 1.2, 1.6, 2.0]
    text = caplog.text
    assert f"run dir: {tmp_path / 'a'}" in text
    assert "train data: " in text and ": layout messages (512 records), using the first 20 (data.train_limit)" in text
    assert "steps: 5 by trainer.epochs=2 (trainer.max_steps=3 ignored), 2.00 epochs of 20 samples, 8 samples" in text
    assert "step 5/5 loss" in text and " GB MFU " in text
    checkpoint = tmp_path / "a" / "checkpoints" / "step_00000004"
    _, resumed = run(tmp_path / "b", *overrides, f"trainer.resume={checkpoint}")
    assert resumed.steps == 5
    assert read_metrics(tmp_path / "b", "train")[-1]["train/loss"] == records[-1]["train/loss"]
    with pytest.raises(ConfigError, match="trainer.max_steps and trainer.epochs are both null"):
        run(tmp_path / "c", "trainer.max_steps=null")
    with pytest.raises(ConfigError, match=r"trainer.epochs=0: must be ≥ 1"):
        run(tmp_path / "c", "trainer.epochs=0")


# The switches the GPU runs with, as run on a CPU. Where a switch has no CPU kernel the nearest one stands in:
# flash_attention_2 (CUDA only) -> sdpa, whose packed rows run the same per-sample loop of causal calls; the
# grouped experts run torch._grouped_mm through aten's CPU fallback, in bf16 like on the GPU.
GPU_SWITCHES_ON_CPU = (
    "model.experts_kernel=grouped",
    "model.attn_implementation=sdpa",
    "trainer.gradient_checkpointing=true",
)


def _bf16_exact_checkpoint(out, family):
    """The tiny family's checkpoint with its weights rounded to bf16: fp32 and bf16 runs start from the same values."""
    from deepseek_vl2_lora.model.tiny import ensure_tiny_checkpoint

    src = ensure_tiny_checkpoint(family)
    model = DeepseekVL2ForCausalLM.from_pretrained(src, torch_dtype=torch.bfloat16)
    model.save_pretrained(
        out, extra_files=[f for f in src.iterdir() if f.name != "config.json" and f.suffix != ".safetensors"]
    )
    return out


def _trained_changes(run_dir, base: dict) -> dict:
    """What training changed: each fully trained tensor minus its checkpoint value, and LoRA B (which starts at
    0). LoRA A is left out: its random start is rounded to the base layer's dtype by PEFT, so bf16 and fp32 runs
    do not share it."""
    lora, full = read_trained_state(run_dir / "trained")
    changes = {n: t.float() - base[n].float() for n, t in full.items()}
    return changes | {n: t.float() for n, t in lora.items() if "lora_B" in n}


@pytest.mark.parametrize(("family", "policy"), [("full-noaux", "mla_lowrank"), ("tiny-mha", "mha_lora")])
def test_bf16_training_with_the_gpu_switches_is_as_close_to_fp32_as_plain_bf16(tmp_path, family, policy):
    """Three packed steps in bf16 autocast over bf16 weights (the GPU's setting) with the GPU's kernels, judged
    against fp32 truth from the same bf16-exact checkpoint: each step's loss, and what the three steps changed in
    the trained tensors, are at most 2x (+1e-3) as far from fp32 as plain bf16 (eager, loop experts, no recompute)
    is."""
    from deepseek_vl2_lora.training.agreement import overall_error, summarize, tensor_errors, within

    ckpt = _bf16_exact_checkpoint(tmp_path / "ckpt", family)
    common = [f"model.path={ckpt}", f"policy={policy}", "trainer.pack_length=4096", "trainer.eval_before=false"]
    common.append("data.eval_path=null")
    bf16 = ["trainer.precision=bf16", "model.dtype=bfloat16"]
    runs = {
        "fp32": ["trainer.precision=fp32", "model.dtype=float32", "model.experts_kernel=loop"],
        "bf16": [*bf16, "model.experts_kernel=loop", "model.attn_implementation=eager"],
        "bf16_gpu_switches": [*bf16, *GPU_SWITCHES_ON_CPU],
    }
    records, changes = {}, {}
    base = DeepseekVL2ForCausalLM.from_pretrained(ckpt).state_dict()
    for name, overrides in runs.items():
        run(tmp_path / name, *common, *overrides)
        records[name] = read_metrics(tmp_path / name, "train")
        assert [r["train/skipped"] for r in records[name]] == [0, 0, 0], name
        assert all(math.isfinite(r["train/loss"]) for r in records[name]), name
        changes[name] = _trained_changes(tmp_path / name, base)
    truth = [r["train/loss"] for r in records["fp32"]]
    assert records["bf16"][0]["train/loss"] != truth[0]  # the bf16 runs did run in bf16
    for step in range(3):  # each step's loss: a function of the weights the steps before trained
        loss_err = {n: abs(records[n][step]["train/loss"] - truth[step]) / truth[step] for n in runs}
        assert within(loss_err["bf16_gpu_switches"], loss_err["bf16"]), (step, loss_err)
    # All trained tensors together, and per tensor. (Not the grad norm: a norm's error is second order in the
    # gradients' error and swung 10x between equally good runs here, 2e-4 vs 2e-3.)
    plain = tensor_errors(changes["bf16"], changes["fp32"])
    switched = tensor_errors(changes["bf16_gpu_switches"], changes["fp32"])
    assert within(summarize(switched)["median"], summarize(plain)["median"]), (switched, plain)
    plain_all = overall_error(changes["bf16"], changes["fp32"])
    assert within(overall_error(changes["bf16_gpu_switches"], changes["fp32"]), plain_all)
