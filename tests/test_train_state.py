"""Pieces of the loop without a model: data order, RNG capture, atomic checkpoints, schedule, FLOP rule, metrics."""

import json
import math
import os
import random

import numpy as np
import pytest
import torch

from deepseek_vl2_lora.data.sampling import EpochBatchSampler, batch_stream, epoch_order
from deepseek_vl2_lora.manifest import main as manifest_main
from deepseek_vl2_lora.training.config import OptimConfig
from deepseek_vl2_lora.training.dist_env import DistEnv
from deepseek_vl2_lora.training.engine import SingleProcessEngine
from deepseek_vl2_lora.training.manifest import MANIFEST_FILE, verify_manifest
from deepseek_vl2_lora.training.metrics import FlopModel, MetricsLogger, read_metrics
from deepseek_vl2_lora.training.optim import lr_factor
from deepseek_vl2_lora.training.train_state import (
    CHECKPOINTS,
    LATEST,
    ResumeError,
    TrainState,
    agree_on_checkpoint,
    clean_temporary,
    find_resume_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


# ------------------------------------------------------------------------------------------------ data order
def test_epoch_order_is_a_permutation_fixed_by_seed_and_epoch():
    a = epoch_order(50, seed=3, epoch=1)
    assert sorted(a) == list(range(50))
    assert a == epoch_order(50, seed=3, epoch=1)
    assert a != epoch_order(50, seed=3, epoch=2)
    assert a != epoch_order(50, seed=4, epoch=1)


def test_sampler_from_a_position_is_the_rest_of_the_epoch():
    full = list(EpochBatchSampler(22, 4, seed=0, epoch=5))
    assert len(full) == 5  # 22 // 4, the partial batch is dropped
    assert [i for b in full for i in b] == epoch_order(22, 0, 5)[:20]
    assert list(EpochBatchSampler(22, 4, seed=0, epoch=5, start=3)) == full[3:]


def test_batch_stream_resumes_where_it_stopped():
    data = list(range(10))
    stream = batch_stream(data, lambda xs: xs, 3, seed=1, epoch=0, start=0)
    seen = [next(stream) for _ in range(8)]  # 3 batches per epoch: crosses two epoch ends
    assert [(e, i) for e, i, _ in seen] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1)]
    state = TrainState(num_samples=10, batch_size=3)
    for e, i, _ in seen[:4]:
        state.advance(e, i)
    assert (state.epoch, state.batch) == (1, 1)
    resumed = batch_stream(data, lambda xs: xs, 3, seed=1, epoch=state.epoch, start=state.batch)
    assert [next(resumed) for _ in range(4)] == seen[4:]


def test_rng_state_round_trip():
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    saved = rng_state()
    first = (random.random(), float(np.random.rand()), torch.rand(3))
    set_rng_state(saved)
    again = (random.random(), float(np.random.rand()), torch.rand(3))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])


# ------------------------------------------------------------------------------------------------ checkpoints
def _engine(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    groups = [{"name": "all", "params": list(model.parameters()), "lr": 0.1, "weight_decay": 0.0}]
    return model, SingleProcessEngine(model, groups, OptimConfig(lr=0.1), max_steps=10, env=DistEnv())


def _train_one(model, engine):
    model(torch.ones(4, 3)).sum().backward()
    engine.step()
    engine.zero_grad()


def test_checkpoint_round_trip_and_keep_last(tmp_path):
    model, engine = _engine()
    for step in range(1, 5):
        _train_one(model, engine)
        state = TrainState(step=step, epoch=0, batch=step, num_samples=8, batch_size=1)
        save_checkpoint(tmp_path, state, dict(model.named_parameters()), engine, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]
    assert (tmp_path / CHECKPOINTS / LATEST).read_text().strip() == "step_00000004"
    assert not [p for p in (tmp_path / CHECKPOINTS).iterdir() if p.name.startswith(".")]

    model2, engine2 = _engine(seed=1)
    loaded = {}
    state, rng = load_checkpoint(latest_checkpoint(tmp_path), engine2, lambda t, src: loaded.update(t))
    assert state.step == 4 and state.batch == 4
    for name, p in model.named_parameters():
        assert torch.equal(loaded[name], p.detach())
    for group, group2 in zip(engine.optimizer.param_groups, engine2.optimizer.param_groups):
        assert group["lr"] == group2["lr"]
    assert engine2.optimizer.state_dict()["state"][0]["step"] == 4


def test_failed_save_leaves_the_previous_checkpoint(tmp_path):
    model, engine = _engine()
    save_checkpoint(tmp_path, TrainState(step=1), dict(model.named_parameters()), engine, keep_last=0)

    def broken(directory):
        raise OSError("disk full")

    engine.save = broken
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, TrainState(step=2), dict(model.named_parameters()), engine, keep_last=0)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001"]
    assert latest_checkpoint(tmp_path).name == "step_00000001"
    assert not [p for p in (tmp_path / CHECKPOINTS).iterdir() if p.name.startswith(".")]


def test_resume_lookup(tmp_path):
    assert find_resume_checkpoint(None, tmp_path) is None
    assert find_resume_checkpoint("auto", tmp_path) is None  # auto with nothing saved: a fresh start
    with pytest.raises(RuntimeError, match="trainer.resume"):
        find_resume_checkpoint(str(tmp_path / "nowhere"), tmp_path)
    model, engine = _engine()
    path = save_checkpoint(tmp_path, TrainState(step=3), dict(model.named_parameters()), engine, keep_last=0)
    (tmp_path / CHECKPOINTS / ".tmp-step_00000009-x").mkdir()  # a run killed mid-save
    (tmp_path / CHECKPOINTS / "step_00000009").mkdir()  # incomplete: no state.json
    assert find_resume_checkpoint("auto", tmp_path) == path
    assert find_resume_checkpoint(str(tmp_path), tmp_path) == path
    assert find_resume_checkpoint(str(path), tmp_path) == path
    clean_temporary(tmp_path)
    assert not (tmp_path / CHECKPOINTS / ".tmp-step_00000009-x").exists()


def test_skipped_step_keeps_parameters_and_moments():
    model, engine = _engine()
    _train_one(model, engine)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {k: v.clone() for k, v in engine.optimizer.state[model.weight].items()}
    model(torch.full((4, 3), float("nan"))).sum().backward()
    assert math.isnan(engine.clip_grad_norm(1.0))
    engine.skip_step()
    engine.zero_grad()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(moments[k], v) for k, v in engine.optimizer.state[model.weight].items())
    assert engine.scheduler.last_epoch == 2  # the schedule still moves on


# ------------------------------------------------------------------------------------------------ schedule
def test_lr_factor_warmup_then_cosine_to_the_floor():
    f = [lr_factor(s, max_steps=20, warmup_steps=4, min_lr_ratio=0.1) for s in range(20)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(f[3:], f[4:]))
    assert lr_factor(20, 20, 4, 0.1) == pytest.approx(0.1)
    assert lr_factor(12, 20, 4, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert lr_factor(0, 10, 0, 0.0) == 1.0


# ------------------------------------------------------------------------------------------------ FLOP rule
def test_lm_flop_rule_by_hand():
    fm = FlopModel(
        lm_active=100, lm_trainable_active=10, lm_layers=2, lm_heads=3, d_qk=4, d_v=5,
        vision=0, vision_trainable=0, vision_layers=0, vision_width=0, patches_per_tile=0,
        projector=0, projector_trainable=0, projected_per_tile=0,
    )  # fmt: skip
    # Two sequences of 2 and 3 real tokens: 5 tokens, 3 + 6 causal (query, key) pairs.
    dense = (4 * 100 + 2 * 10) * 5
    attention = 3 * (2 * (3 + 6) * 2 * 3 * (4 + 5))
    assert fm.lm_flops([2, 3]) == dense + attention


def test_vision_flops_forward_only_when_frozen():
    kw = dict(lm_active=0, lm_trainable_active=0, lm_layers=0, lm_heads=0, d_qk=0, d_v=0, vision_layers=1,
              vision_width=8, patches_per_tile=4, projector=10, projected_per_tile=1)  # fmt: skip
    frozen = FlopModel(vision=50, vision_trainable=0, projector_trainable=0, **kw)
    assert frozen.vision_flops(2) == 2 * (2 * 50 * 4 + 1 * 2 * 2 * 8 * 16 + 2 * 10 * 1)
    trained = FlopModel(vision=50, vision_trainable=50, projector_trainable=10, **kw)
    per_tile = 4 * 50 * 4 + 2 * 50 * 4 + 3 * (2 * 2 * 8 * 16) + (2 + 2 + 2) * 10
    assert trained.vision_flops(1) == per_tile


# ------------------------------------------------------------------------------------------------ metrics file
def test_metrics_jsonl_nonfinite_and_truncation(tmp_path):
    logger = MetricsLogger(tmp_path)
    for step in range(1, 6):
        logger.log(step, "train", {"train/loss": float("nan") if step == 2 else 1.0 / step})
    logger.log(5, "event", {"event": "checkpoint"})
    raw = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert raw[1]["train/loss"] == "nan"
    assert logger.truncate_after(3) == 3
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    assert MetricsLogger(tmp_path, jsonl=False).truncate_after(0) == 0


def test_metrics_partial_last_line_is_dropped_with_a_warning(tmp_path, caplog):
    logger = MetricsLogger(tmp_path)
    for step in range(1, 4):
        logger.log(step, "train", {"train/loss": 1.0})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "kind": "tr')  # a killed run's last write
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    assert logger.truncate_after(2) == 2
    assert "metrics.jsonl line 4 is not a whole JSON record, dropped" in caplog.text
    logger.log(3, "train", {"train/loss": 0.5})
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]  # the file ends with whole lines again


# ------------------------------------------------------------------------------------------------ verified resume
def _saved_run(tmp_path, steps=(1, 2)):
    model, engine = _engine()
    for step in steps:
        _train_one(model, engine)
        save_checkpoint(tmp_path, TrainState(step=step), dict(model.named_parameters()), engine, keep_last=0)
    return [tmp_path / CHECKPOINTS / f"step_{s:08d}" for s in steps]


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated": (_truncate, "truncated ("),
    "zero-byte": (lambda p: p.write_bytes(b""), "empty (0 bytes"),
    "garbage": (lambda p: p.write_bytes(os.urandom(p.stat().st_size)), "checksum mismatch"),
    "deleted": (lambda p: p.unlink(), "missing"),
    "flipped": (_flip, "checksum mismatch"),
}
FILES = ["trainable.safetensors", "optimizer.pt", "rng.pt", "state.json", "manifest.json"]


@pytest.mark.parametrize("file", FILES)
@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_newest_checkpoint_is_reported_and_the_older_one_used(tmp_path, caplog, damage, file):
    older, newest = _saved_run(tmp_path)
    assert verify_manifest(older) == verify_manifest(newest) == []
    how, what = DAMAGE[damage]
    how(newest / file)
    problems = verify_manifest(newest)
    if file == "manifest.json":  # its own damage: unreadable or gone
        what = "missing" if damage == "deleted" else ("unreadable" if damage != "flipped" else "")
    assert len(problems) == 1 and problems[0].startswith(f"{file}: ") and what in problems[0], problems
    assert find_resume_checkpoint("auto", tmp_path) == older
    assert find_resume_checkpoint(str(tmp_path), tmp_path) == older
    assert f"checkpoint {newest} is damaged, not using it: {file}: " in caplog.text
    with pytest.raises(ResumeError, match=f"trainer.resume={newest}: the checkpoint is damaged: {file}: "):
        find_resume_checkpoint(str(newest), tmp_path)  # named by hand: no fallback


def test_no_intact_checkpoint_names_every_damaged_file(tmp_path):
    older, newest = _saved_run(tmp_path)
    (older / "extra.pt").write_bytes(b"not ours")
    _truncate(newest / "optimizer.pt")
    with pytest.raises(ResumeError) as err:
        find_resume_checkpoint("auto", tmp_path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"no intact checkpoint in {tmp_path / CHECKPOINTS}")
    assert (
        "step_00000002: optimizer.pt: truncated" in message
        and "step_00000001: extra.pt: not in the manifest" in message
    )
    assert find_resume_checkpoint("auto", tmp_path, verify=False) == newest  # other ranks: rank 0 decides


def test_the_manifest_lists_every_file_and_is_written_last(tmp_path):
    (path,) = _saved_run(tmp_path, steps=(1,))
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    assert sorted(manifest["files"]) == ["optimizer.pt", "rng.pt", "state.json", "trainable.safetensors"]
    assert all(e["size"] == (path / n).stat().st_size for n, e in manifest["files"].items())
    assert (path / MANIFEST_FILE).stat().st_mtime_ns >= max((path / n).stat().st_mtime_ns for n in manifest["files"])


def test_every_rank_takes_rank_0s_verified_choice(tmp_path):
    """Under DeepSpeed rank 0 verifies and may fall back; the other ranks (verify=False) found the newest one and
    take rank 0's step instead (agree_on_checkpoint, with a stand-in for the engine's all-gather)."""
    older, newest = _saved_run(tmp_path)
    _flip(newest / "trainable.safetensors")

    class Rank:
        def __init__(self, rank, rank0_step):
            self.env, self.rank0_step = DistEnv(rank=rank, local_rank=rank, world_size=2), rank0_step

        def gather_from_ranks(self, values):
            return [[self.rank0_step], values]

    on_rank0 = find_resume_checkpoint("auto", tmp_path)
    on_rank1 = find_resume_checkpoint("auto", tmp_path, verify=False)
    assert (on_rank0, on_rank1) == (older, newest)
    assert agree_on_checkpoint(Rank(1, 1), on_rank1) == older
    assert agree_on_checkpoint(Rank(0, 1), on_rank0) == older
    assert agree_on_checkpoint(Rank(1, -1), None) is None  # nothing to resume anywhere
    with pytest.raises(ResumeError, match="rank 0 another one"):
        agree_on_checkpoint(Rank(1, -1), on_rank1)


def test_a_checkpoint_from_before_manifests_is_used_once_vouched_for(tmp_path, capsys):
    (path,) = _saved_run(tmp_path, steps=(1,))
    (path / MANIFEST_FILE).unlink()  # as an older version wrote it
    with pytest.raises(ResumeError, match=f"python -m deepseek_vl2_lora.manifest {path}"):
        find_resume_checkpoint("auto", tmp_path)
    assert manifest_main([str(path)]) == 0
    assert find_resume_checkpoint("auto", tmp_path) == path
    assert manifest_main(["--verify", str(path)]) == 0
    _flip(path / "rng.pt")
    assert manifest_main(["--verify", str(path)]) == 1
    assert "rng.pt: checksum mismatch" in capsys.readouterr().out
