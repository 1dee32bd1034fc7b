"""The run's micro batches: `trainer.micro_batch_size` samples per rank, or with `data.tokens_per_micro_batch` a
token budget (`data/budget.py`: packed rows binned across the dataset). How many micro batches each epoch has, the
run's step count, the stream the loop reads, and what the console and data_report.json say about the packing."""

from __future__ import annotations

import logging

from ..data.budget import TokenBudget, dataset_lengths
from ..data.sampling import batch_stream, batches_per_epoch
from .config import ConfigError
from .train_state import total_steps

log = logging.getLogger(__name__)


def micro_batch_of(data_cfg, trainer_cfg) -> int:
    """The micro batch a config runs per rank: trainer.micro_batch_size samples, or with data.tokens_per_micro_batch
    that many tokens in packed rows of trainer.pack_length."""
    tokens = data_cfg.get("tokens_per_micro_batch")
    return tokens // trainer_cfg.pack_length if tokens else trainer_cfg.micro_batch_size


class Batching:
    """One run's batching (every rank builds the same; see `data.budget` for the token budget's plan)."""

    def __init__(self, data_cfg, trainer_cfg, train_set, world_size: int, seed: int):
        self.tokens = data_cfg.get("tokens_per_micro_batch")
        self.pack_length = trainer_cfg.pack_length
        self.num_samples, self.world_size, self.seed = len(train_set), world_size, seed
        self.budget = None
        self.micro_batch = micro_batch_of(data_cfg, trainer_cfg)  # per rank: samples, or packed rows with a budget
        if self.tokens:
            order = getattr(train_set, "epoch_order", None)  # a mixture's
            lengths = dataset_lengths(train_set)
            self.budget = TokenBudget(lengths, self.pack_length, self.micro_batch, world_size, seed, order)
        self._logged_epoch = None

    def per_epoch(self, epoch: int) -> int:
        """Global micro batches in `epoch` (the same on every rank)."""
        if self.budget is not None:
            return self.budget.micro_batches(epoch)
        return batches_per_epoch(self.num_samples, self.micro_batch * self.world_size)

    def check(self) -> None:
        """A training set too small for one global micro batch is a ConfigError."""
        if self.per_epoch(0) > 0:
            return
        if self.budget is None:
            raise ConfigError(
                f"the training set has {self.num_samples} usable samples, fewer than trainer.micro_batch_size="
                f"{self.micro_batch} × {self.world_size} rank(s)"
            )
        raise ConfigError(
            f"the training set's {self.num_samples} usable samples fill fewer rows than one micro batch of "
            f"data.tokens_per_micro_batch={self.tokens} (rows of trainer.pack_length={self.pack_length}) × "
            f"{self.world_size} rank(s): lower data.tokens_per_micro_batch or trainer.pack_length"
        )

    def total_steps(self, max_steps: int | None, epochs: int | None, grad_accum: int) -> int:
        return total_steps(max_steps, epochs, self.per_epoch, grad_accum)

    def epochs_read(self, micro_batches: int) -> float:
        """How many epochs `micro_batches` global micro batches from the start cover (whole ones plus a fraction)."""
        epoch = 0
        while micro_batches >= self.per_epoch(epoch) > 0:
            micro_batches -= self.per_epoch(epoch)
            epoch += 1
        return epoch + micro_batches / max(self.per_epoch(epoch), 1)

    def describe(self, steps: int, grad_accum: int) -> str:
        """The step plan's per-step line (what a step holds)."""
        ranks = f"{self.world_size} rank(s)"
        epochs = self.epochs_read(steps * grad_accum)
        if self.budget is None:
            per_step = self.micro_batch * self.world_size * grad_accum
            return (
                f"{epochs:.2f} epochs of {self.num_samples} samples, {per_step} samples per step (micro batch "
                f"{self.micro_batch} × grad accum {grad_accum} × {ranks})"
            )
        first = self.budget.stats(0)
        return (
            f"{epochs:.2f} epochs of {self.num_samples} samples, {self.tokens * self.world_size * grad_accum} tokens "
            f"per step (data.tokens_per_micro_batch={self.tokens}: {self.micro_batch} rows of {self.pack_length} × "
            f"grad accum {grad_accum} × {ranks}); epoch 0: {first['micro_batches']} micro batches, packing "
            f"efficiency {first['efficiency']:.1%}"
        )

    def packing_report(self, steps: int, grad_accum: int) -> dict | None:
        """data_report.json's `train.packing`: the budget and, per epoch the run reads, its packing
        (`EpochBins.stats`); None without a budget."""
        if self.budget is None:
            return None
        epochs = max(1, -int(-self.epochs_read(steps * grad_accum) // 1))
        return {
            "tokens_per_micro_batch": self.tokens,
            "pack_length": self.pack_length,
            "rows_per_micro_batch": self.micro_batch,
            "window": self.budget.window,
            "epochs": [self.budget.stats(e) for e in range(epochs)],
        }

    def signature(self) -> dict | None:
        """What the data position depends on besides (seed, epoch, samples): the budget's plan (for resume)."""
        return None if self.budget is None else {"tokens_per_micro_batch": self.tokens, **self.budget.signature()}

    def stream(self, dataset, collate_fn, epoch: int, start: int, num_workers: int, pin_memory: bool, rank: int):
        """(epoch, global micro batch index, this rank's micro batch) from data position (epoch, start) on; with a
        budget, each epoch's packing efficiency is logged when the stream enters it."""
        stream = batch_stream(
            dataset, collate_fn, self.micro_batch, self.seed, epoch, start, num_workers=num_workers,
            pin_memory=pin_memory, rank=rank, world_size=self.world_size, budget=self.budget,
        )  # fmt: skip
        for item in stream:
            if self.budget is not None and item[0] != self._logged_epoch:
                self._logged_epoch = item[0]
                s = self.budget.stats(item[0])
                t = s["tokens_per_micro_batch"]
                log.info(
                    "epoch %d: %d micro batches of %d rows, packing efficiency %.1f%% (%d real tokens), tokens per "
                    "rank and micro batch %.0f mean, %d-%d (budget %d)", item[0], s["micro_batches"],
                    self.micro_batch, 100 * s["efficiency"], s["tokens"], t["mean"], t["min"], t["max"], t["budget"],
                )  # fmt: skip
            yield item
