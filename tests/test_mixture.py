"""Mixtures of training sources (data.train): the epoch order, per-source counts through the real DataLoader stream,
even repeats, config errors, the data report, and bitwise-exact resume of a mixture run."""

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from test_train_config import compose_cfg

from deepseek_vl2_lora.data import CollateItems, Mixture, SFTDataset, SkipBadSamples, unwrap_batch
from deepseek_vl2_lora.data.mixture import largest_remainder, source_names
from deepseek_vl2_lora.data.processor import SampleError
from deepseek_vl2_lora.data.report import DataReport
from deepseek_vl2_lora.data.sampling import EpochBatchSampler, batch_stream
from deepseek_vl2_lora.training import train
from deepseek_vl2_lora.training.config import ConfigError, check_config
from deepseek_vl2_lora.training.metrics import read_metrics
from deepseek_vl2_lora.training.train_state import ResumeError

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "data" / "demo"


def text_records(path: Path, tag: str, n: int) -> Path:
    """n text-only records; record i asks about `<tag> <i>` and answers `<tag>` (the source's tag)."""
    lines = [
        {"messages": [{"role": "user", "content": f"item {tag} {i}"}, {"role": "assistant", "content": tag}]}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


# ------------------------------------------------------------------------------------------------ the order
def test_order_is_a_function_of_seed_and_epoch():
    def build():
        return Mixture(["a", "b"], [list(range(40)), list(range(200))], [3, 1])

    a, b = build(), build()
    assert a.epoch_order(0, 0) == b.epoch_order(0, 0)  # rebuilt from nothing but (seed, epoch, sizes, weights)
    assert a.epoch_order(7, 3) == b.epoch_order(7, 3)
    assert a.epoch_order(0, 0) != a.epoch_order(0, 1)
    assert a.epoch_order(0, 0) != a.epoch_order(1, 0)
    assert len(a.epoch_order(0, 5)) == 240 and all(0 <= i < 240 for i in a.epoch_order(0, 5))


def test_single_source_order_is_unchanged():
    """A dataset without its own order keeps the randperm seeded by seed × 1_000_003 + epoch (written out here)."""
    sampler = EpochBatchSampler(10, 2, seed=3, epoch=2)
    reference = torch.randperm(10, generator=torch.Generator().manual_seed(3 * 1_000_003 + 2)).tolist()
    assert [i for batch in sampler for i in batch] == reference


def test_largest_remainder_and_names():
    assert largest_remainder(240, [3, 1]) == [180, 60]
    assert largest_remainder(10, [1, 1, 1]) == [4, 3, 3]  # remainders tie: the earlier source
    assert largest_remainder(7, [0.1, 0.2, 0.7]) == [1, 1, 5]  # quotas 0.7, 1.4, 4.9
    specs = [{"path": "x/train.jsonl"}, {"path": "y/train.jsonl"}, {"path": "z/b.jsonl", "name": "mine"}]
    assert source_names(specs) == ["train", "train_1", "mine"]


def test_three_to_one_counts_through_the_loader_stream_and_even_repeats(proc, tmp_path):
    """Sources of 40 and 200 records weighted 3:1: over one epoch the DataLoader stream yields 180 and 60 samples
    (3:1 within 2 %), told apart by the answer each source's records carry; each small-source record comes 4 or 5
    times (180 draws over 40 records), no large-source record twice."""
    small = SFTDataset(text_records(tmp_path / "small.jsonl", "red", 40), proc)
    large = SFTDataset(text_records(tmp_path / "large.jsonl", "blue", 200), proc)
    mixture = Mixture(["small", "large"], [small, large], [3, 1])
    # Independent identification: each record's encoding, computed from its own dataset.
    ids = {tuple(small[i]["input_ids"].tolist()): ("small", i) for i in range(40)}
    ids |= {tuple(large[i]["input_ids"].tolist()): ("large", i) for i in range(200)}
    red, blue = proc.tokenize("red"), proc.tokenize("blue")

    stream = batch_stream(mixture, list, batch_size=4, seed=0, epoch=0, start=0, world_size=2, rank=0)
    other = batch_stream(mixture, list, batch_size=4, seed=0, epoch=0, start=0, world_size=2, rank=1)
    seen, answers = [], Counter()
    for _ in range(240 // 8):  # one epoch, both ranks
        for s in (stream, other):
            epoch, _, batch = next(s)
            assert epoch == 0
            for enc in batch:
                seen.append(ids[tuple(enc["input_ids"].tolist())])
                answer = enc["labels"][enc["labels"] != -100].tolist()[:-1]  # (the eos)
                answers["small" if answer == red else "large" if answer == blue else "?"] += 1
    counts = Counter(source for source, _ in seen)
    assert counts == answers  # the tag in the answers and the identified records agree
    assert counts["small"] + counts["large"] == 240
    assert abs(counts["small"] / counts["large"] / 3 - 1) <= 0.02
    per_record = Counter(seen)
    assert {per_record[("small", i)] for i in range(40)} <= {4, 5}
    assert sum(per_record[("small", i)] for i in range(40)) == counts["small"]
    assert {n for (source, _), n in per_record.items() if source == "large"} == {1}


def test_down_weighted_source_is_covered_over_epochs():
    """Weights 1:3 on 200 and 40 records: the large source gets 60 draws an epoch and visits all 200 records once
    in its first 200 draws (epochs 0-3, the 4th epoch's first 20), before any repeats."""
    mixture = Mixture(["large", "small"], [list(range(200)), list(range(40))], [1, 3])
    assert mixture.draws == [60, 180]
    drawn = [i for e in range(4) for i in mixture.epoch_order(0, e) if i < 200]
    assert len(drawn) == 240 and Counter(Counter(drawn).values()) == Counter({1: 160, 2: 40})


def test_train_time_skips_count_against_their_source():
    class Flaky(torch.utils.data.Dataset):
        def __init__(self, n, bad=()):
            self.n, self.bad = n, set(bad)

        def __len__(self):
            return self.n

        def __getitem__(self, i):
            if i in self.bad:
                raise SampleError("missing_image", f"record {i}: image gone")
            return {"i": i}

    mixture = Mixture(["a", "b"], [Flaky(3), Flaky(4, bad={1})], [1, 1])
    data = SkipBadSamples(mixture, "skip")
    assert data.epoch_order == mixture.epoch_order  # the wrapper forwards the order
    collated = CollateItems(list, "skip")([data[4], data[0]])  # global 4 = b's record 1: replaced by b's record 2
    total, a, b = DataReport("all"), DataReport("a"), DataReport("b")
    assert unwrap_batch(collated, total, {"a": a, "b": b}) == [{"i": 2}, {"i": 0}]
    assert total.skipped_at_train == b.skipped_at_train == Counter({"missing_image": 1}) and not a.skipped_at_train


# ------------------------------------------------------------------------------------------------ config
def test_cli_example_composes_and_checks():
    cfg = compose_cfg(
        "data.train=[{path:data/demo/train.jsonl,weight:3},{path:other.jsonl,weight:1}]", "data.train_path=null"
    )
    check_config(cfg)
    assert OmegaConf.to_container(cfg.data.train) == [
        {"path": "data/demo/train.jsonl", "weight": 3},
        {"path": "other.jsonl", "weight": 1},
    ]


NO_PATH = "data.train_path=null"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ([NO_PATH, "data.train=[{path:a.jsonl,wieght:3}]"], "data.train[0].wieght: unknown key; a source takes path"),
        ([NO_PATH, "data.train=[{path:a.jsonl},{path:b.jsonl,weight:0}]"], "data.train[1].weight=0: must be a number"),
        ([NO_PATH, "data.train=[{path:a.jsonl,weight:abc}]"], "data.train[0].weight=abc: must be a number > 0"),
        ([NO_PATH, "data.train=[{weight:2}]"], "data.train[0]: no path; give each source one"),
        ([NO_PATH, "data.train=[{path:a.jsonl,name:x},{path:b,name:x}]"], "data.train[1].name=x: another source has"),
        ([NO_PATH, "data.train=[{path:a.jsonl,limit:0}]"], "data.train[0].limit=0: must be an integer ≥ 1"),
        ([NO_PATH, "data.train=[]"], "data.train=[]: must be a non-empty list of sources"),
        (["data.train=[a.jsonl]"], "data.train lists sources: set data.train_path=null"),
        (
            [NO_PATH, "data.train=[a.jsonl]", "data.train_limit=16"],
            "data.train_limit=16 does not apply to a mixture: set data.train_limit=null",
        ),
        ([NO_PATH], "data.train_path=null and data.train=null: set one of them"),
    ],
)
def test_config_errors_are_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        check_config(compose_cfg(*overrides))
    assert str(err.value).startswith(f"invalid config: {message}") and "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------------ training
@pytest.fixture
def tiny_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DEEPSEEK_VL2_LORA_CACHE", str(tmp_path_factory.getbasetemp() / "tiny_cache"))
    monkeypatch.setenv("WANDB_MODE", "disabled")


def demo_sources(tmp_path: Path) -> tuple[Path, Path]:
    """Demo records 0-7 and 8-23 as two files outside data/demo (their images found through data.image_root)."""
    lines = (DEMO / "train.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "small.jsonl").write_text("".join(lines[:8]))
    (tmp_path / "large.jsonl").write_text("".join(lines[8:24]))
    return tmp_path / "small.jsonl", tmp_path / "large.jsonl"


def mixture_run(run_dir, small, large, *overrides, weights=(3, 1)):
    cfg = compose_cfg(
        "experiment=smoke",
        "data.train_limit=null",
        "data.train_path=null",
        f"data.train=[{{path:'{small}',weight:{weights[0]}}},{{path:'{large}',weight:{weights[1]},name:big}}]",
        f"data.image_root={DEMO}",
        "data.eval_path=null",
        "trainer.eval_before=false",
        "trainer.save_trained=false",
        "trainer.micro_batch_size=4",
        "trainer.max_steps=8",  # 24 draws per epoch, 6 batches: the run crosses into epoch 1
        "trainer.save_every=3",
        "trainer.keep_last=0",
        "trainer.print_every=1",
        *overrides,
    )
    check_config(cfg)
    return train(cfg, run_dir)


def test_mixture_run_reports_sources_and_resumes_bitwise(tiny_cache, tmp_path, caplog):
    small, large = demo_sources(tmp_path)
    with caplog.at_level("INFO", logger="deepseek_vl2_lora.training"):
        mixture_run(tmp_path / "full", small, large)
    text = caplog.text
    assert "train data: mixture of 2 sources, 24 draws per epoch: layout messages (24 records)" in text
    assert f"train/small data: {small}: layout messages (8 records), weight 3, 18 draws per epoch (75.0%)" in text
    assert f"train/big data: {large}: layout messages (16 records), weight 1, 6 draws per epoch (25.0%)" in text
    assert "0.33 epochs" not in text and "1.33 epochs of 24 samples" in text
    report = json.loads((tmp_path / "full" / "data_report.json").read_text())
    assert set(report) == {"train", "train/small", "train/big"}
    assert (report["train/small"]["kept"], report["train/big"]["kept"]) == (8, 16)
    assert report["train/small"]["sampling"] == {
        "name": "small", "records": 8, "weight": 3.0, "draws_per_epoch": 18, "share": 0.75
    }  # fmt: skip
    assert report["train/big"]["sampling"]["draws_per_epoch"] == 6 and report["train"]["kept"] == 24

    checkpoint = tmp_path / "full" / "checkpoints" / "step_00000003"  # mid-epoch
    mixture_run(tmp_path / "resumed", small, large, f"trainer.resume={checkpoint}")
    keys = ("step", "train/loss", "train/aux_loss", "train/grad_norm", "train/lr", "train/tokens", "train/epoch")
    full = [{k: r[k] for k in keys} for r in read_metrics(tmp_path / "full", "train")]
    resumed = [{k: r[k] for k in keys} for r in read_metrics(tmp_path / "resumed", "train")]
    assert [r["step"] for r in resumed] == [4, 5, 6, 7, 8]
    assert resumed == full[3:]  # bitwise: exact float equality

    with pytest.raises(ResumeError, match="its data order is for the mixture"):
        mixture_run(tmp_path / "other", small, large, f"trainer.resume={checkpoint}", weights=(1, 1))
