"""The research workflow: Hydra multirun with W&B sweep metadata, the eval CLI, the comparison report, the
multi-GPU sweep script and a chat.py smoke test. One tiny two-policy sweep (subprocess) is shared by the tests."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deepseek_vl2_lora import compare as compare_mod
from deepseek_vl2_lora import eval as eval_mod
from deepseek_vl2_lora.data import EvalDataset, SFTDataset
from deepseek_vl2_lora.data.processor import DeepseekVL2Processor
from deepseek_vl2_lora.evaluation.eval_set import evaluate
from deepseek_vl2_lora.model import DeepseekVL2ForCausalLM
from deepseek_vl2_lora.model.tiny import ensure_tiny_checkpoint
from deepseek_vl2_lora.training.sweep import (
    SWEEP_DIR_ENV,
    SWEEP_JOB_ENV,
    SWEEP_RUN_ENV,
    SweepContext,
    hydra_context,
    wandb_names,
)

ROOT = Path(__file__).resolve().parents[1]
# Long enough that both policies get some eval answers right (accuracies are not all zero), a few seconds each.
RUN_ARGS = [
    "experiment=smoke",
    "trainer.max_steps=60",
    "trainer.micro_batch_size=16",
    "data.train_limit=null",
    "data.eval_limit=16",
    "optim.warmup_steps=5",
]
POLICIES = ("mla_lowrank", "lora_o_mlp")


def _env(cache: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (SWEEP_DIR_ENV, SWEEP_JOB_ENV, SWEEP_RUN_ENV)}
    env.update(DEEPSEEK_VL2_LORA_CACHE=str(cache), WANDB_MODE="offline", WANDB_SILENT="true", **extra)
    return env


def _run(cmd, env, timeout=300):
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "tiny_cache"  # the one test_train_loop uses: generated once


@pytest.fixture(autouse=True)
def _env_vars(cache, monkeypatch):
    monkeypatch.setenv("DEEPSEEK_VL2_LORA_CACHE", str(cache))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.delenv(SWEEP_DIR_ENV, raising=False)
    monkeypatch.delenv(SWEEP_JOB_ENV, raising=False)
    monkeypatch.delenv(SWEEP_RUN_ENV, raising=False)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, cache):
    """`python train.py -m ... policy=mla_lowrank,lora_o_mlp logger=wandb` (offline): two run dirs."""
    sweep_dir = tmp_path_factory.mktemp("workflow") / "policies"
    cmd = [sys.executable, "train.py", "-m", *RUN_ARGS, f"policy={','.join(POLICIES)}", "logger=wandb"]
    _run([*cmd, f"hydra.sweep.dir={sweep_dir}"], _env(cache))
    return sweep_dir


def _json(path: Path):
    return json.loads(path.read_text())


def _records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def wandb_run_record(run_dir: Path):
    """The run record (group, display name, tags) W&B itself wrote into the offline run's .wandb file.

    The file is a LevelDB-style log: a 7-byte header, then 32 KiB blocks of records with a 7-byte header
    (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) around protobuf `Record`s."""
    pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")
    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data, pos, buf, block = path.read_bytes(), 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        buf += data[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            if record.WhichOneof("record_type") == "run":
                return record.run
    raise AssertionError(f"{path}: no run record")


# ------------------------------------------------------------------------------------------------ sweeps
def test_multirun_makes_one_run_dir_per_job_with_sweep_wandb_metadata(sweep):
    runs = [sweep / "0", sweep / "1"]
    metas = []
    for run_dir, policy in zip(runs, POLICIES):
        assert (run_dir / "summary.json").is_file() and (run_dir / "trained" / "policy.json").is_file()
        assert _json(run_dir / "trainable_parameters.json")["policy"] == policy
        meta = _json(run_dir / "wandb_run.json")
        assert meta["group"] == f"smoke-{sweep.name}"  # one group per sweep: experiment name + sweep dir
        assert f"policy={policy}" in meta["tags"] and "experiment=smoke" in meta["tags"]
        assert meta["name"] == f"policy={policy}"  # the swept key's value
        assert meta["tags"] == [*RUN_ARGS, f"policy={policy}"]  # every override that defines the run
        assert not any(t.startswith(("logger", "hydra")) for t in meta["tags"])
        assert meta["sweep_dir"] == str(sweep) and meta["mode"] == "offline"
        record = wandb_run_record(run_dir)  # what W&B will show, not only our own json
        assert (record.run_group, record.display_name, list(record.tags), record.run_id) == (
            meta["group"],
            meta["name"],
            meta["tags"],
            meta["id"],
        )
        metas.append(meta)
    assert metas[0]["group"] == metas[1]["group"]
    assert metas[0]["name"] != metas[1]["name"] and metas[0]["tags"] != metas[1]["tags"]
    assert metas[0]["id"] != metas[1]["id"]
    assert [m["job_num"] for m in metas] == [0, 1]


def test_wandb_names_from_sweep_context():
    overrides = ["policy=lora_o_mlp", "seed=1", "logger=wandb", "logger.mode=online", "+trainer.resume=auto"]
    ctx = SweepContext(overrides=overrides, sweep_dir="multirun/policies", job_num=3)
    names = wandb_names("default", ["demo"], "multirun/policies/3", ctx)
    assert names.group == "default-policies"
    assert names.name == "policy=lora_o_mlp,seed=1"  # swept keys unknown: all (relevant) overrides
    assert names.tags == ["demo", "policy=lora_o_mlp", "seed=1"]
    ctx.swept = ["policy"]
    assert wandb_names("default", [], "multirun/policies/3", ctx).name == "policy=lora_o_mlp"
    # Outside a sweep: the experiment name is the group; the run dir names the run; overrides still tag it.
    single = wandb_names("default", [], "outputs/default/2026-01-01_00-00-00", SweepContext(["seed=1"]))
    assert (single.group, single.name, single.tags) == ("default", "default-2026-01-01_00-00-00", ["seed=1"])
    # Explicit logger.group / logger.run_name win; tags are deduplicated and cut to W&B's 64 characters.
    long = "data.train_path=/" + "x" * 100
    named = wandb_names("default", ["seed=1"], "d", SweepContext(["seed=1", long], "s"), group="g", run_name="r")
    assert (named.group, named.name) == ("g", "r")
    assert named.tags[0] == "seed=1" and len(named.tags) == 2 and len(named.tags[1]) == 64


def test_hydra_context_outside_hydra_reads_the_sweep_script_environment(monkeypatch):
    assert hydra_context() == SweepContext()
    monkeypatch.setenv(SWEEP_DIR_ENV, "multirun/zero2")
    monkeypatch.setenv(SWEEP_JOB_ENV, "2")
    assert hydra_context() == SweepContext(overrides=[], sweep_dir="multirun/zero2", job_num=2)
    monkeypatch.setenv(SWEEP_RUN_ENV, "policy=lora_o_mlp +seed=1")
    assert hydra_context().swept == ["policy", "seed"]


def test_sweep_multi_gpu_script_dry_run(tmp_path):
    cmd = ["bash", "scripts/sweep_multi_gpu.sh", "-x", "-n", "4", "-d", str(tmp_path / "s"), "-c", "dist=zero2"]
    out = _run([*cmd, "--", "policy=mla_lowrank seed=0", "policy=lora_o_mlp"], os.environ.copy()).stdout
    lines = [line for line in out.splitlines() if line.startswith("[sweep")]
    train_py = ROOT / "train.py"
    assert len(lines) == 2
    for i, overrides in enumerate(["policy=mla_lowrank seed=0", "policy=lora_o_mlp"]):
        assert lines[i].endswith(
            f"deepspeed --num_gpus 4 --no_local_rank {train_py} dist=zero2 hydra.run.dir={tmp_path / 's'}/{i} "
            + overrides
        )
        assert f"{SWEEP_DIR_ENV}={tmp_path / 's'} {SWEEP_JOB_ENV}={i} " in lines[i]
    assert not (tmp_path / "s").exists()  # a dry run writes nothing
    failed = subprocess.run(["bash", "scripts/sweep_multi_gpu.sh", "-x"], cwd=ROOT, capture_output=True, text=True)
    assert failed.returncode == 2 and "no runs given" in failed.stderr


def test_sweep_multi_gpu_script_runs_one_by_one(tmp_path, cache):
    """With a one-process launcher the script runs for real on CPU: run dirs, runs.tsv, W&B group from the env."""
    sweep_dir = tmp_path / "zero"
    runs_file = tmp_path / "runs.txt"
    runs_file.write_text("# one run per line\npolicy=mla_lowrank seed=1\n\n")
    common = "experiment=smoke trainer.max_steps=2 data.eval_limit=4 trainer.eval_before=false logger=wandb"
    cmd = ["bash", "scripts/sweep_multi_gpu.sh", "-l", sys.executable, "-d", str(sweep_dir), "-c", common]
    _run([*cmd, "-f", str(runs_file)], _env(cache))
    assert (sweep_dir / "runs.tsv").read_text().splitlines()[1] == f"{sweep_dir}/0\t0\tpolicy=mla_lowrank seed=1"
    meta = _json(sweep_dir / "0" / "wandb_run.json")
    assert (meta["group"], meta["name"], meta["job_num"]) == ("smoke-zero", "policy=mla_lowrank,seed=1", 0)
    assert meta["tags"] == [*common.split()[:-1], "policy=mla_lowrank", "seed=1"]  # logger=wandb left out


# ------------------------------------------------------------------------------------------------ eval
def test_eval_cli_on_a_run_dir_reproduces_its_final_eval(sweep):
    run_dir = sweep / "1"  # lora_o_mlp: the adapter is re-created and loaded
    out = _run([sys.executable, "-m", "deepseek_vl2_lora.eval", str(run_dir)], os.environ.copy()).stdout
    assert "lora_o_mlp" in out
    ev = _json(run_dir / "eval.json")
    after = _json(run_dir / "summary.json")["eval_after"]
    assert ev["kind"] == "trained" and ev["policy"] == "lora_o_mlp"
    assert ev["trainable_params"] == _json(run_dir / "trainable_parameters.json")["trainable_params"]
    assert ev["metrics"].keys() == after.keys()
    assert ev["metrics"]["eval/loss"] == pytest.approx(after["eval/loss"], rel=1e-6)
    assert {k: v for k, v in ev["metrics"].items() if k != "eval/loss"} == {
        k: v for k, v in after.items() if k != "eval/loss"
    }
    assert ev["metrics"]["eval/samples"] == 16 and ev["metrics"]["eval/accuracy"] > 0
    # The predictions are the run's final ones, answer for answer.
    predictions = (run_dir / "eval.predictions.jsonl").read_text().splitlines()
    assert predictions == (run_dir / "eval" / "step_00000060.jsonl").read_text().splitlines()

    # The trained-state dir of the run gives the same; --baseline gives the run's eval before training.
    assert eval_mod.main([str(run_dir / "trained"), "--out", str(run_dir / "eval_trained.json")]) == 0
    assert _json(run_dir / "eval_trained.json")["metrics"] == pytest.approx(ev["metrics"], rel=1e-6)
    assert eval_mod.main([str(run_dir), "--baseline"]) == 0
    base = _json(run_dir / "eval_baseline.json")
    assert base["kind"] == "baseline" and base["trainable_params"] == 0
    assert base["metrics"] == pytest.approx(_json(run_dir / "summary.json")["eval_before"], rel=1e-6)


def test_eval_cli_on_a_bare_checkpoint_is_the_untrained_baseline(tmp_path, sweep):
    ckpt = ensure_tiny_checkpoint("full-noaux")
    out = tmp_path / "baseline" / "eval.json"
    assert eval_mod.main([str(ckpt), "experiment=smoke", "data.eval_limit=16", "--out", str(out)]) == 0
    ev = _json(out)
    assert ev["kind"] == "baseline" and ev["label"] == "untrained baseline" and ev["model_dir"] == str(ckpt)

    # evaluate() run directly on the same model and split.
    model = DeepseekVL2ForCausalLM.from_pretrained(ckpt, attn_implementation="eager")
    processor = DeepseekVL2Processor.from_pretrained(ckpt)
    eval_file = ROOT / "data" / "demo" / "eval.jsonl"
    loss_set = SFTDataset(eval_file, processor, overlong="skip", max_length=4096)
    gen_set = EvalDataset(eval_file, processor, max_length=4096)
    direct = evaluate(model, processor, loss_set, gen_set, torch.device("cpu"), 8, 4, limit=16)
    assert ev["metrics"] == pytest.approx(direct.metrics(), rel=1e-6)
    assert ev["loss_tokens"] == direct.loss_tokens
    lines = out.with_suffix(".predictions.jsonl").read_text().splitlines()
    assert [json.loads(line)["prediction"] for line in lines] == [p["prediction"] for p in direct.predictions]
    # ... and it is what the sweep's runs measured before training.
    assert ev["metrics"] == pytest.approx(_json(sweep / "0" / "summary.json")["eval_before"], rel=1e-6)


def test_eval_cli_rejects_what_it_cannot_evaluate(tmp_path, capsys):
    assert eval_mod.main([str(tmp_path)]) == 2
    assert "not a run dir" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ compare
def expected_row(run_dir: Path, label: str, last: int = 10) -> str:
    """The table row written out independently from the run's files."""
    summary = _json(run_dir / "summary.json")
    params = _json(run_dir / "trainable_parameters.json")
    train = _records(run_dir, "train")
    loss = [r["train/loss"] for r in train][-last:]
    tokens_per_s = sum(r["train/tokens"] for r in train) / sum(r["perf/step_time_s"] for r in train)
    mem = max(r["mem/peak_rss_gb"] for r in train)
    after = summary["eval_after"]
    cells = [
        label,
        params["policy"],
        f"{params['trainable_params']:,} ({params['percent']:.2f}%)",
        str(summary["steps"]),
        f"{sum(loss) / len(loss):.4f}",
        f"{after['eval/loss']:.4f}",
        f"{after['eval/accuracy']:.3f}",
        f"{tokens_per_s:,.0f}",
        f"{mem:.2f} (RSS)",
        f"{summary['seconds']:.1f}",
    ]
    return "| " + " | ".join(cells) + " |"


def test_compare_report_matches_the_run_files(sweep, tmp_path):
    out = tmp_path / "report"
    assert compare_mod.main([str(sweep), "--out", str(out)]) == 0  # the sweep dir expands to its run dirs
    md = (out / "compare.md").read_text()
    lines = [line for line in md.splitlines() if line.startswith("|")]
    assert len(lines) == 2 + 3  # header, rule, baseline, two runs
    assert lines[3] == expected_row(sweep / "0", "policy=mla_lowrank")
    assert lines[4] == expected_row(sweep / "1", "policy=lora_o_mlp")
    before = _json(sweep / "0" / "summary.json")["eval_before"]
    assert lines[2].startswith(
        f"| untrained baseline | – | 0 | – | – | {before['eval/loss']:.4f} | {before['eval/accuracy']:.3f} |"
    )

    rows = _json(out / "compare.json")
    assert [r["kind"] for r in rows] == ["baseline", "run", "run"]
    for row, run_dir in zip(rows[1:], [sweep / "0", sweep / "1"]):
        summary = _json(run_dir / "summary.json")
        assert row["eval_loss"] == summary["eval_after"]["eval/loss"]
        assert row["eval_accuracy"] == summary["eval_after"]["eval/accuracy"]
        assert row["wall_s"] == summary["seconds"]
        assert row["trainable_params"] == _json(run_dir / "trainable_parameters.json")["trainable_params"]
        assert row["train_loss"] == pytest.approx(
            sum(r["train/loss"] for r in _records(run_dir, "train")[-10:]) / 10, rel=1e-12
        )
    assert rows[0]["eval_loss"] == before["eval/loss"] and rows[0]["trainable_params"] == 0

    png = out / "loss_curves.png"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    width, height = struct.unpack(">II", data[16:24])
    assert width > 1000 and height > 300


def test_compare_script_cli_and_baseline_eval_input(sweep, tmp_path):
    """scripts/compare.py with run dirs and a baseline eval dir; equal baselines are shown once."""
    base = tmp_path / "baseline"
    eval_json = {"kind": "baseline", "label": "untrained baseline", "trainable_params": 0}
    metrics = _json(sweep / "0" / "summary.json")["eval_before"]
    base.mkdir()
    (base / "eval.json").write_text(json.dumps({**eval_json, "metrics": metrics}))
    out = tmp_path / "cli"
    cmd = [sys.executable, "scripts/compare.py", str(sweep / "0"), str(sweep / "1"), str(base), "--out", str(out)]
    stdout = _run(cmd, os.environ.copy()).stdout
    assert stdout.count("| untrained baseline |") == 1 and (out / "loss_curves.png").stat().st_size > 0
    # A different baseline gets its own row, named after where it came from.
    (base / "eval.json").write_text(json.dumps({**eval_json, "metrics": {**metrics, "eval/loss": 1.0}}))
    rows = compare_mod.build_rows(compare_mod.load_paths([sweep / "0", base]))
    labels = [r.label for r in rows if r.kind == "baseline"]
    assert labels == ["untrained baseline (policies/0)", "untrained baseline (baseline)"]


def test_aggregate_over_seeds():
    def row(label, group, acc):
        return compare_mod.Row(label, "run", label, "p", 1, 1.0, 1, 2.0, 3.0, acc, 8, 100.0, 1.0, "rss", 1.0, group)

    rows = [row("policy=a, seed=0", "policy=a", 0.5), row("policy=a, seed=1", "policy=a", 1.0)]
    table = compare_mod.aggregate_table([*rows, row("policy=b", "policy=b", 0.25)])
    assert "| policy=a | p | 2 | 2.0000 ± 0.0000 | 3.0000 ± 0.0000 | 0.750 ± 0.354 | 100 ± 0 |" in table  # sample std
    assert "| policy=b | p | 1 | 2.0000 | 3.0000 | 0.250 | 100 |" in table
    assert compare_mod.aggregate_table(rows[:1]) is None  # nothing to average: no second table


def test_compare_rejects_a_dir_without_runs(tmp_path, capsys):
    assert compare_mod.main([str(tmp_path)]) == 2
    assert "no run dirs" in capsys.readouterr().err


class FakeRun:
    def __init__(self, id, name, policy, history, summary):
        self.id, self.name, self._history, self.summary = id, name, history, summary
        self.config = {"policy": {"name": policy}, "sweep": {"overrides": [f"policy={policy}", "logger=wandb"]}}

    def scan_history(self):
        return iter(self._history)


class FakeApi:
    def __init__(self, runs):
        self._runs, self.calls = runs, []

    def runs(self, path, filters=None):
        self.calls.append((path, filters))
        return self._runs


def test_compare_from_wandb_public_api_shape():
    """The W&B reader on the shapes the public API returns (rows merged per step, eval and train in one row)."""
    history = [
        {"_step": 0, "eval/loss": 7.0, "eval/accuracy": 0.0, "eval/samples": 16},
        *[
            {"_step": s, "train/loss": 5.0 - s, "train/tokens": 100, "perf/step_time_s": 0.5, "mem/peak_rss_gb": s}
            for s in (1, 2, 3)
        ],
    ]
    history[-1].update({"eval/loss": 2.5, "eval/accuracy": 0.75, "eval/samples": 16})
    summary = {"params/trainable": 50, "params/total": 1000, "_runtime": 9.0, "eval/accuracy": 0.75}
    api = FakeApi([FakeRun("abc", "policy=lora_o_mlp", "lora_o_mlp", history, summary)])
    runs = compare_mod.load_wandb("me/proj", group="default-policies", api=api)
    assert api.calls == [("me/proj", {"group": "default-policies"})]
    base, row = compare_mod.build_rows(runs, last=2)
    assert (base.kind, base.eval_loss, base.eval_accuracy) == ("baseline", 7.0, 0.0)
    assert (row.label, row.policy, row.trainable_params) == ("policy=lora_o_mlp", "lora_o_mlp", 50)
    assert row.trainable_percent == 5.0
    assert (row.steps, row.train_loss, row.eval_loss, row.eval_accuracy) == (3, 2.5, 2.5, 0.75)
    assert (row.tokens_per_s, row.peak_mem_gb, row.wall_s) == (200.0, 3.0, 9.0)


# ------------------------------------------------------------------------------------------------ chat
def test_chat_cli_answers_like_the_eval(sweep):
    """scripts/chat.py with a run's trained state streams the answer the run's final eval predicted."""
    run_dir = sweep / "0"
    record = json.loads((ROOT / "data" / "demo" / "eval.jsonl").read_text().splitlines()[1])
    prediction = json.loads((run_dir / "eval" / "step_00000060.jsonl").read_text().splitlines()[1])["prediction"]
    ckpt = ensure_tiny_checkpoint("full-noaux")
    cmd = [sys.executable, "scripts/chat.py", str(ckpt), "--trained", str(run_dir / "trained"), "--attn", "eager"]
    cmd += ["--image", str(ROOT / "data" / "demo" / record["images"][0]), "--prompt", record["messages"][0]["content"]]
    out = _run([*cmd, "--max-new-tokens", "4", "--device", "cpu"], os.environ.copy()).stdout
    assert out.strip() == prediction
