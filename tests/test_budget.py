"""Token-budget batching (data.tokens_per_micro_batch, deepseek_vl2_lora/data/budget.py): the bin plan's invariants
(no row over its length, every sample once per epoch, the same micro batch count on every rank, N ranks = one process
with N times the budget), the rows the loader packs, and a training run resumed mid-epoch, bit for bit."""

import importlib.util
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from test_train_config import compose_cfg

from deepseek_vl2_lora.data import CollateItems, Collator, Mixture, SFTDataset, SkipBadSamples, unwrap_batch
from deepseek_vl2_lora.data.budget import TokenBudget, best_fit_decreasing, dataset_lengths, fill_tail
from deepseek_vl2_lora.data.processor import SampleError
from deepseek_vl2_lora.data.report import DataReport
from deepseek_vl2_lora.data.sampling import batch_stream
from deepseek_vl2_lora.training import train
from deepseek_vl2_lora.training.config import ConfigError, check_config
from deepseek_vl2_lora.training.metrics import read_metrics
from deepseek_vl2_lora.training.train_state import CHECKPOINTS

ROOT = Path(__file__).resolve().parents[1]


def rank_batches(budget: TokenBudget, epoch: int = 0) -> list[list[list[tuple[int, int]]]]:
    """[rank][micro batch] -> the (row, sample) keys its sampler yields."""
    return [list(budget.sampler(epoch, 0, r)) for r in range(budget.world_size)]


def rows_of(keys: list[tuple[int, int]]) -> list[list[int]]:
    rows: dict[int, list[int]] = {}
    for row, index in keys:
        rows.setdefault(row, []).append(index)
    return list(rows.values())


def _bench_packing():
    spec = importlib.util.spec_from_file_location("bench_packing", ROOT / "scripts" / "bench_packing.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


long_tailed = _bench_packing().long_tailed  # the benchmark's length mix: Pareto(1.2) lengths in [low, high]


# ------------------------------------------------------------------------------------------------ the plan
@pytest.mark.parametrize("seed", range(12))
def test_bins_hold_at_most_the_budget_and_every_sample_exactly_once(seed):
    rng = random.Random(seed)
    capacity, rows, world = rng.randint(20, 90), rng.randint(1, 3), rng.choice([1, 2, 3])
    lengths = [rng.randint(1, capacity) for _ in range(rng.randint(40, 300))]
    budget = TokenBudget(lengths, capacity, rows, world, seed=seed, window=rng.choice([8, 32, 2048]))
    for epoch in (0, 1):
        per_rank = rank_batches(budget, epoch)
        count = budget.micro_batches(epoch)
        assert count > 0 and [len(b) for b in per_rank] == [count] * world  # the same on every rank
        used = Counter()
        for batches in per_rank:
            for keys in batches:
                mine = rows_of(keys)
                assert len(mine) == rows  # every row of the micro batch has a sample
                assert all(sum(lengths[i] for i in row) <= capacity for row in mine)
                assert sum(lengths[i] for _, i in keys) <= rows * capacity
                used.update(i for _, i in keys)
        dropped = budget.bins(epoch).dropped
        assert used + Counter(dropped) == Counter(range(len(lengths)))  # every sample once (none left out here)
        assert dropped == []


def test_the_plan_is_a_function_of_seed_and_epoch_and_ranks_share_it():
    lengths = long_tailed(500, seed=1, low=5, high=60)
    a, b = TokenBudget(lengths, 128, 2, 2, seed=7), TokenBudget(lengths, 128, 2, 2, seed=7)
    assert rank_batches(a, 3) == rank_batches(b, 3)
    assert rank_batches(a, 3) != rank_batches(a, 4)
    assert rank_batches(a, 3) != rank_batches(TokenBudget(lengths, 128, 2, 2, seed=8), 3)
    resumed = list(a.sampler(3, start=5, rank=1))  # from global micro batch 5 on: the rest of the epoch
    assert resumed == rank_batches(a, 3)[1][5:]


def test_n_ranks_train_on_the_rows_of_one_process_with_n_times_the_budget():
    lengths = long_tailed(700, seed=2, low=4, high=50)
    one, two = TokenBudget(lengths, 96, 4, 1, seed=0), TokenBudget(lengths, 96, 2, 2, seed=0)
    (single,), (rank0, rank1) = rank_batches(one), rank_batches(two)
    assert len(single) == len(rank0) == len(rank1)
    for b in range(len(single)):
        both = sorted(map(tuple, rows_of(rank0[b]) + rows_of(rank1[b])))
        assert both == sorted(map(tuple, rows_of(single[b])))
        assert not set(i for _, i in rank0[b]) & set(i for _, i in rank1[b])


def test_best_fit_decreasing_and_the_tail():
    assert best_fit_decreasing([5, 3, 4, 2, 6], 8) == [[4, 3], [0, 1], [2]]  # 6+2, 5+3, 4
    # 5 rows for micro batches of 2: the row with most samples gives up its shortest one
    rows, split, dropped = fill_tail([[0, 1, 2], [3], [4], [5, 6], [7]], [3, 1, 2, 5, 5, 2, 2, 5], 2)
    assert (rows, split, dropped) == ([[0, 2], [3], [4], [5, 6], [7], [1]], 1, [])
    # every row a single sample: the least-filled row of the partial micro batch is left out of the epoch
    rows, split, dropped = fill_tail([[0], [1], [2]], [4, 2, 3], 2)
    assert (rows, split, dropped) == ([[0], [2]], 0, [1])


def test_a_mixture_bins_its_draws():
    class Source(list):
        def __init__(self, lengths):
            super().__init__(range(len(lengths)))
            self.lengths = lengths

    small, large = Source([10, 20, 30, 40]), Source([25] * 30)
    mixture = Mixture(["small", "large"], [small, large], [3, 1])
    assert dataset_lengths(mixture) == small.lengths + large.lengths
    budget = TokenBudget(dataset_lengths(mixture), 100, 1, 1, seed=0, order=mixture.epoch_order)
    for epoch in (0, 1):
        used = Counter(i for keys in rank_batches(budget, epoch)[0] for _, i in keys)
        assert used == Counter(mixture.epoch_order(0, epoch))  # each draw once (a small-source record repeats)


def test_packing_efficiency_on_a_long_tailed_mix():
    """4096-token rows, 8192-token micro batches (docs/benchmarks.md measures the same on more data)."""
    lengths = long_tailed(4000, seed=3)
    budget = TokenBudget(lengths, 4096, 2, 1, seed=0)
    for epoch in (0, 1):
        tokens = [sum(lengths[i] for _, i in keys) for keys in rank_batches(budget, epoch)[0]]
        assert budget.stats(epoch)["efficiency"] == sum(lengths) / (len(tokens) * 8192) >= 0.97
        assert (max(tokens) - min(tokens)) / (sum(tokens) / len(tokens)) <= 0.05  # the epoch's tail included


# ------------------------------------------------------------------------------------------------ the loader
class _Flaky(torch.utils.data.Dataset):
    """A dataset whose sample `bad` fails to load (an image gone since validation)."""

    def __init__(self, dataset, bad: int):
        self.dataset, self.bad = dataset, bad

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        if i == self.bad:
            raise SampleError("missing_image", "gone", f"train.jsonl:{i + 1}")
        return self.dataset[i]


def test_the_stream_packs_the_planned_rows(proc):
    """Real samples through SkipBadSamples, CollateItems and the collator: each row of a batch is the planned
    row, its samples' encodings in order (token ids compared with each sample encoded on its own: validation's
    lengths are the encoded ones), and a sample gone bad is left out of its row and counted."""
    data = SFTDataset("data/demo/train.jsonl", proc, cache_dir=False)
    subset = torch.utils.data.Subset(data, range(40))
    lengths = dataset_lengths(subset)
    assert lengths == [len(subset[i]["input_ids"]) for i in range(40)]
    budget = TokenBudget(lengths, 400, 2, 1, seed=0)  # (samples of ~110 tokens: 3 per row)
    first = budget.bins(0).rows[:2]
    bad = max(first, key=len)[0]  # (from a row of several samples: the row stays)
    assert len(max(first, key=len)) >= 2
    report = DataReport("train")
    collator = Collator(proc.pad_id, pack_length=400)
    items, collate = SkipBadSamples(_Flaky(subset, bad), "skip"), CollateItems(collator, "skip")
    stream = batch_stream(items, collate, 0, 0, 0, 0, budget=budget)
    epoch, index, collated = next(stream)
    batch = unwrap_batch(collated, report)
    assert (epoch, index) == (0, 0) and report.skipped_at_train == Counter({"missing_image": 1})
    planned = [[i for i in row if i != bad] for row in first]
    assert batch["input_ids"].shape[0] == 2 and batch["input_ids"].shape[1] <= 400
    for row, members in enumerate(planned):
        expected = torch.cat([subset[i]["input_ids"] for i in members])
        assert batch["input_ids"][row, : len(expected)].equal(expected)
        assert batch["segment_ids"][row].max() == len(members)
    assert [i for rows in rows_of(next(iter(budget.sampler(0)))) for i in rows] == first[0] + first[1]
    items, collate = SkipBadSamples(_Flaky(subset, bad), "error"), CollateItems(collator, "error")
    with pytest.raises(SampleError, match=f"train.jsonl:{bad + 1}: gone"):  # under `error`: one line naming it
        unwrap_batch(next(batch_stream(items, collate, 0, 0, 0, 0, budget=budget))[2])


# ------------------------------------------------------------------------------------------------ training
BUDGET = ["data.tokens_per_micro_batch=200", "trainer.pack_length=100"]
RUN = ["experiment=smoke", "data.train_limit=32", "data.eval_path=null", *BUDGET, "trainer.cpu_threads=1"]


@pytest.fixture(autouse=True)
def tiny_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DEEPSEEK_VL2_LORA_CACHE", str(tmp_path_factory.getbasetemp() / "tiny_cache"))
    monkeypatch.setenv("WANDB_MODE", "disabled")


def test_epochs_are_exact_and_a_resume_mid_epoch_is_bitwise(tmp_path):
    """trainer.epochs=2 runs exactly the micro batches the two epochs' plans hold (computed here from the
    validated lengths, independently of the run); resumed from a checkpoint in the middle of epoch 0, the run
    gives the same losses, norms and trained tensors, bit for bit."""
    args = [*RUN, "trainer.epochs=2", "trainer.save_every=3", "trainer.keep_last=10", "policy=mla_lowrank_lora"]
    full = train(compose_cfg(*args), tmp_path / "full")
    data = SFTDataset("data/demo/train.jsonl", _processor(), max_length=100, cache_dir=False)
    plan = TokenBudget(data.lengths[:32], 100, 2, 1, seed=0)
    per_epoch = [plan.micro_batches(0), plan.micro_batches(1)]
    assert full.steps == sum(per_epoch) and per_epoch[0] > 3  # step 3 is mid-epoch
    records = read_metrics(tmp_path / "full", "train")
    assert records[-1]["train/epoch"] == 2.0 and records[per_epoch[0] - 1]["train/epoch"] == 1.0
    assert sum(r["train/samples"] for r in records) == 64  # every sample once per epoch
    assert sum(r["train/tokens"] for r in records) == 2 * sum(data.lengths[:32])

    resumed = train(compose_cfg(*args, f"trainer.resume={tmp_path / 'full' / CHECKPOINTS / 'step_00000003'}"),
                    tmp_path / "resumed")  # fmt: skip
    keys = ("step", "train/loss", "train/aux_loss", "train/grad_norm", "train/tokens", "train/epoch")
    got = [{k: r[k] for k in keys} for r in read_metrics(tmp_path / "resumed", "train")]
    assert got == [{k: r[k] for k in keys} for r in records if r["step"] > 3]
    from safetensors.torch import load_file

    a, b = (load_file(d / "adapter_model.safetensors") for d in (full.trained_dir, resumed.trained_dir))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def _processor():
    from deepseek_vl2_lora.data.processor import DeepseekVL2Processor
    from deepseek_vl2_lora.training.preflight import resolve_model_dir

    return DeepseekVL2Processor.from_pretrained(resolve_model_dir(compose_cfg(*RUN).model))


def test_a_sample_longer_than_a_row_is_over_long(tmp_path):
    with pytest.raises(SampleError, match=r"train.jsonl:1: .*longer than a row of trainer.pack_length=20.*overlong"):
        train(compose_cfg("experiment=smoke", "data.tokens_per_micro_batch=40", "trainer.pack_length=20"), tmp_path)


def test_budget_config_errors():
    for overrides, message in (
        (["data.tokens_per_micro_batch=1000"], "set it too, e.g. trainer.pack_length=1000"),
        (["data.tokens_per_micro_batch=1000", "trainer.pack_length=300"], "must be a multiple of"),
    ):
        with pytest.raises(ConfigError, match=message):
            check_config(compose_cfg(*overrides))
