"""Token-budget batching (``data.tokens_per_micro_batch``): every micro batch carries about the same number of
tokens, binned across the dataset (what Megatron's and fairseq's ``max_tokens`` and axolotl's multipack give).

A micro batch is ``rows_per_micro_batch`` = tokens_per_micro_batch / trainer.pack_length rows of at most
``capacity`` = trainer.pack_length tokens, each row several samples packed (each attending only to itself,
`packing`). An epoch's bins (`TokenBudget.bins`):

1. The epoch's order: `sampling.epoch_order(n, seed, epoch)`, or a mixture's own (`Mixture.epoch_order`).
2. Windows of `WINDOW` samples in that order, each binned by best-fit decreasing (longest sample first, into the
   row with the least room that still holds it). The rows of a window filled below `FULL` of the capacity give
   their samples back to the next window (at most a quarter of a window's samples), so only the epoch's last
   window leaves part-filled rows, and a sample moves at most a few windows from its place in the order. The
   last window (the rest of the order) adds the rows that make whole global micro batches (below) and spreads the
   samples of its least-filled rows evenly over those and the new rows (`spread_tail`), so the epoch's shortfall
   is shared by many rows instead of falling on a few.
3. Global micro batches of G = rows_per_micro_batch × world size rows, dealt by load so that their token counts
   are even (`deal`), in a random order (seeded by seed and epoch); rank r takes rows r, r + W, r + 2W, ... of
   each (its rows_per_micro_batch rows, dealt evenly too). Which rows make a global micro batch depends on G only,
   so N ranks train on the rows one process with N times the budget would.
4. The tail: where spreading cannot make whole global micro batches (too little room), rows holding several
   samples are split (their shortest sample moved to a row of its own) until they do, so every sample is used
   exactly once per epoch and every rank runs the same number of micro batches. Only with too few samples for that
   (every row a single sample) are the least-filled rows of the last partial micro batch left out of that epoch
   (`EpochBins.dropped`).

The plan needs the samples' token lengths only (`dataset_lengths`: what validation computed from the image headers,
no pixels decoded), so it is a function of (lengths, capacity, rows per global micro batch, seed, epoch): every rank
computes the same one, a resumed run too, and the number of micro batches of every epoch is known before training.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import math
from dataclasses import dataclass, field

import torch

from .sampling import epoch_order

# Samples binned together: about a hundred rows of real data, where best-fit is within ~1 % of ideal. A window
# sorts its samples by length, so a window as large as the data set would pack the same rows every epoch; smaller
# windows differ from epoch to epoch (and keep each sample near its place in the shuffled order).
WINDOW = 512
FULL = 0.98  # a row filled less than this goes back into the next window
_PRIME = 1_000_003


def dataset_lengths(dataset) -> list[int]:
    """The token length of every sample of a training set (an SFTDataset, a Subset or Mixture of them, or any
    dataset with a `lengths` list), as validation computed it."""
    if isinstance(getattr(dataset, "lengths", None), list):
        return list(dataset.lengths)
    if isinstance(dataset, torch.utils.data.Subset):
        lengths = dataset_lengths(dataset.dataset)
        return [lengths[i] for i in dataset.indices]
    if isinstance(getattr(dataset, "datasets", None), list):  # a Mixture: its sources, concatenated
        return [n for part in dataset.datasets for n in dataset_lengths(part)]
    if hasattr(dataset, "dataset"):  # a wrapper (SkipBadSamples)
        return dataset_lengths(dataset.dataset)
    raise TypeError(f"{type(dataset).__name__} does not know its samples' token lengths")


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Rows of positions into `lengths`, each row's total ≤ capacity: longest first (ties keep the input order),
    each into the row with the least room that still holds it (ties: the earliest row); deterministic."""
    rows: list[list[int]] = []
    rooms: list[tuple[int, int]] = []  # (room left, row) of every row with room, sorted
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"a sample of {n} tokens does not fit a row of {capacity}")
        k = bisect.bisect_left(rooms, (n, -1))
        if k < len(rooms):
            room, r = rooms.pop(k)
            rows[r].append(i)
        else:
            room, r = capacity, len(rows)
            rows.append([i])
        if room > n:
            bisect.insort(rooms, (room - n, r))
    return rows


def balanced(lengths: list[int], capacity: int, n_rows: int) -> list[list[int]] | None:
    """Rows of positions into `lengths` spread over exactly `n_rows` rows with even loads (longest first, each into
    the least-loaded row; ties: the earliest); None when a sample does not fit or a row would stay empty."""
    if len(lengths) < n_rows:
        return None
    rows: list[list[int]] = [[] for _ in range(n_rows)]
    loads = [(0, r) for r in range(n_rows)]  # a heap of (load, row)
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        load, r = heapq.heappop(loads)
        if load + lengths[i] > capacity:
            return None
        rows[r].append(i)
        heapq.heappush(loads, (load + lengths[i], r))
    return rows


def spread_tail(rows: list[list[int]], lengths: list[int], capacity: int, extra: int) -> list[list[int]]:
    """`rows` and `extra` more rows, the samples of the least-filled rows spread evenly over those and the new ones
    (`balanced`): as many of them as still fit, from all the rows down by a fifth at a time; unchanged where none
    do."""
    by_load = sorted(range(len(rows)), key=lambda r: (sum(lengths[i] for i in rows[r]), r))
    k = len(rows)
    while k:
        items = [i for r in by_load[:k] for i in rows[r]]
        spread = balanced([lengths[i] for i in items], capacity, k + extra)
        if spread is not None:
            kept = set(by_load[k:])
            return [row for r, row in enumerate(rows) if r in kept] + [[items[p] for p in row] for row in spread]
        k = k * 4 // 5
    return rows


def plan_rows(
    order: list[int], lengths: list[int], capacity: int, window: int = WINDOW, group: int = 1
) -> list[list[int]]:
    """Rows of sample indices: `order` binned window by window (see the module docstring, step 2; the last window
    takes the rest of the order too). The last window's samples are spread evenly over as many rows as make whole
    groups of `group` rows, where they fit."""
    out: list[list[int]] = []
    carry: list[int] = []
    last = max(len(order) // window - 1, 0) * window  # where the last window starts
    for start in range(0, last + 1, window):
        items = carry + order[start : start + window if start < last else len(order)]
        rows = [[items[p] for p in row] for row in best_fit_decreasing([lengths[i] for i in items], capacity)]
        if start == last:
            return out + spread_tail(rows, lengths, capacity, -(len(out) + len(rows)) % group)
        loads = [sum(lengths[i] for i in row) for row in rows]
        under = sorted((r for r in range(len(rows)) if loads[r] < FULL * capacity), key=lambda r: (loads[r], r))
        carried, carry = set(), []
        for r in under:
            if len(carry) + len(rows[r]) > window // 4:
                break
            carried.add(r)
            carry += rows[r]
        out += [row for r, row in enumerate(rows) if r not in carried]
    return out


def fill_tail(rows: list[list[int]], lengths: list[int], group: int) -> tuple[list[list[int]], int, list[int]]:
    """(rows, rows split off, samples left out): rows split until they make whole groups of `group` rows (module
    docstring, step 4)."""
    rows = [list(row) for row in rows]
    missing = split = -len(rows) % group
    while missing:
        r = max(range(len(rows)), key=lambda j: (len(rows[j]), -j))  # the row with the most samples
        if len(rows[r]) < 2:
            break
        shortest = min(range(len(rows[r])), key=lambda p: (lengths[rows[r][p]], -p))
        rows.append([rows[r].pop(shortest)])
        missing -= 1
    if not missing:
        return rows, split, []
    loads = [sum(lengths[i] for i in row) for row in rows]
    out = set(sorted(range(len(rows)), key=lambda r: (loads[r], r))[: len(rows) % group])
    kept = [row for r, row in enumerate(rows) if r not in out]
    return kept, split - missing, [i for r in sorted(out) for i in rows[r]]


def deal(rows: list[list[int]], lengths: list[int], group: int, world_size: int, generator) -> list[list[int]]:
    """The rows in training order (module docstring, step 3): dealt by load into micro batches of `group` rows with
    even token counts (the rows sorted by load, tier t of each micro batch from the t-th `len/group` of them, in
    snake order), the micro batches in a random order; within one, its rows ordered so that rank r's slice
    [r::world_size] takes the tiers in snake order too (even ranks' token counts). Which rows make a micro batch
    depends on `group` only, not on how many ranks share it."""
    units = len(rows) // group
    loads = [sum(lengths[i] for i in row) for row in rows]
    by_load = sorted(range(len(rows)), key=lambda r: (-loads[r], r))
    dealt = []
    for u in range(units):
        unit = [by_load[t * units + (u if t % 2 == 0 else units - 1 - u)] for t in range(group)]
        blocks = [unit[t : t + world_size] for t in range(0, group, world_size)]
        dealt.append([r for k, block in enumerate(blocks) for r in (block if k % 2 == 0 else block[::-1])])
    return [rows[r] for u in torch.randperm(units, generator=generator).tolist() for r in dealt[u]]


@dataclass
class EpochBins:
    """One epoch's plan: its rows in training order (global micro batch b = rows[b·G:(b+1)·G])."""

    epoch: int
    rows: list[list[int]]
    group: int  # rows per global micro batch (rows per micro batch × world size)
    capacity: int
    tokens: int  # real tokens in the rows
    dropped: list[int] = field(default_factory=list)  # samples left out of this epoch (too few to split rows)
    split: int = 0  # rows split off to make whole micro batches

    @property
    def micro_batches(self) -> int:
        return len(self.rows) // self.group

    def stats(self, lengths: list[int], world_size: int) -> dict:
        """Packing efficiency (real tokens / budget) and the spread of a rank's tokens per micro batch."""
        per_rank = [
            sum(lengths[i] for row in self.rows[b * self.group : (b + 1) * self.group][r::world_size] for i in row)
            for b in range(self.micro_batches)
            for r in range(world_size)
        ] or [0]
        return {
            "epoch": self.epoch,
            "micro_batches": self.micro_batches,
            "rows": len(self.rows),
            "samples": sum(len(row) for row in self.rows),
            "tokens": self.tokens,
            "efficiency": self.tokens / max(len(self.rows) * self.capacity, 1),
            "tokens_per_micro_batch": {"budget": self.capacity * self.group // world_size, **token_spread(per_rank)},
            "rows_split": self.split,
            "samples_left_out": len(self.dropped),
        }


def token_spread(tokens: list[int]) -> dict:
    """The spread of tokens per micro batch: mean, min, max, coefficient of variation and the share of micro
    batches within 5 % of the mean."""
    mean = sum(tokens) / len(tokens)
    std = math.sqrt(sum((t - mean) ** 2 for t in tokens) / len(tokens))
    within = sum(abs(t - mean) <= 0.05 * mean for t in tokens) / len(tokens)
    return {"mean": mean, "min": min(tokens), "max": max(tokens), "cv": std / mean if mean else 0.0,
            "within_5pct": within}  # fmt: skip


class TokenBudget:
    """The token-budget plan of a training set: `bins(epoch)`, `micro_batches(epoch)` and each rank's sampler.

    `order(seed, epoch)`: the epoch's order of sample indices (a Mixture's); None: `sampling.epoch_order`."""

    def __init__(
        self,
        lengths: list[int],
        capacity: int,
        rows_per_micro_batch: int,
        world_size: int,
        seed: int,
        order=None,
        window: int = WINDOW,
    ):
        too_long = [i for i, n in enumerate(lengths) if n > capacity]
        if too_long:
            raise ValueError(f"sample {too_long[0]} has {lengths[too_long[0]]} tokens, more than a row of {capacity}")
        self.lengths, self.capacity, self.window = list(lengths), capacity, window
        self.rows_per_micro_batch, self.world_size, self.seed = rows_per_micro_batch, world_size, seed
        self.group = rows_per_micro_batch * world_size
        self.order = order
        self._bins: EpochBins | None = None
        self._stats: dict[int, dict] = {}  # per epoch planned so far (`EpochBins.stats`)

    def bins(self, epoch: int) -> EpochBins:
        if self._bins is None or self._bins.epoch != epoch:
            n = len(self.lengths)
            order = epoch_order(n, self.seed, epoch) if self.order is None else self.order(self.seed, epoch)
            rows = plan_rows(order, self.lengths, self.capacity, self.window, self.group)
            rows, split, dropped = fill_tail(rows, self.lengths, self.group)
            key = ((self.seed * _PRIME + epoch) * _PRIME + 1) % 2**63  # not epoch_order's stream
            rows = deal(rows, self.lengths, self.group, self.world_size, torch.Generator().manual_seed(key))
            tokens = sum(self.lengths[i] for row in rows for i in row)
            self._bins = EpochBins(epoch, rows, self.group, self.capacity, tokens, dropped, split)
            self._stats[epoch] = self._bins.stats(self.lengths, self.world_size)
        return self._bins

    def micro_batches(self, epoch: int) -> int:
        """Global micro batches in `epoch` (every rank runs this many)."""
        return self.stats(epoch)["micro_batches"]

    def stats(self, epoch: int) -> dict:
        """`EpochBins.stats` of `epoch` (planned once; kept)."""
        if epoch not in self._stats:
            self.bins(epoch)
        return self._stats[epoch]

    def sampler(self, epoch: int, start: int = 0, rank: int = 0) -> BudgetBatchSampler:
        return BudgetBatchSampler(self, epoch, start, rank)

    def signature(self) -> dict:
        """What the plan depends on besides (seed, epoch), for resume: capacity, rows per global micro batch,
        window and a digest of the sample lengths."""
        digest = hashlib.sha256(",".join(map(str, self.lengths)).encode()).hexdigest()[:16]
        return {"pack_length": self.capacity, "rows_per_global_micro_batch": self.group, "window": self.window,
                "samples": len(self.lengths), "lengths_sha256": digest}  # fmt: skip


class BudgetBatchSampler(torch.utils.data.Sampler):
    """This rank's micro batches of one epoch from global micro batch `start` on (a DataLoader `batch_sampler`):
    each a list of (row within the micro batch, sample index) keys, for `SkipBadSamples` and `CollateItems`."""

    def __init__(self, budget: TokenBudget, epoch: int, start: int, rank: int):
        if not 0 <= rank < budget.world_size:
            raise ValueError(f"rank {rank} is not in a world of {budget.world_size}")
        self.budget, self.epoch, self.start, self.rank = budget, epoch, start, rank

    def __iter__(self):
        bins, g, w = self.budget.bins(self.epoch), self.budget.group, self.budget.world_size
        for b in range(self.start, bins.micro_batches):
            rows = bins.rows[b * g : (b + 1) * g][self.rank :: w]
            yield [(r, i) for r, row in enumerate(rows) for i in row]

    def __len__(self) -> int:
        return self.budget.micro_batches(self.epoch) - self.start
