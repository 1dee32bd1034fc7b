"""The deterministic data order: each epoch's order is a function of (seed, epoch) only, cut into global batches of
micro batch × world size, each rank taking its interleaved slice (or binned into token-budget micro batches,
`budget`); a resumed run starts at its data position (epoch, batch) and reads exactly what the uninterrupted run
would have."""

from __future__ import annotations

import torch


def epoch_order(num_samples: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=generator).tolist()


def batches_per_epoch(num_samples: int, batch_size: int) -> int:
    """Whole batches of `batch_size` (with several ranks: the global batch, micro batch × world size)."""
    return num_samples // batch_size


class EpochBatchSampler(torch.utils.data.Sampler):
    """This rank's index batches of one epoch, from global batch `start` on (a DataLoader `batch_sampler`).

    Global batch b is `order[b·G:(b+1)·G]` with G = batch_size × world_size; rank r gets its slice [r::world_size].
    `order(seed, epoch)`: the epoch's order of `num_samples` indices (a `Mixture`'s); None: `epoch_order`.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int,
        epoch: int,
        start: int = 0,
        rank: int = 0,
        world_size=1,
        order=None,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of {world_size}")
        self.num_samples, self.batch_size, self.seed, self.epoch, self.start = (
            num_samples,
            batch_size,
            seed,
            epoch,
            start,
        )
        self.rank, self.world_size = rank, world_size
        self.global_batch = batch_size * world_size
        self.order = order

    def __iter__(self):
        if self.order is None:
            order = epoch_order(self.num_samples, self.seed, self.epoch)
        else:
            order = self.order(self.seed, self.epoch)
            if len(order) != self.num_samples:
                raise ValueError(f"the epoch order has {len(order)} indices for {self.num_samples} samples")
        g = self.global_batch
        for b in range(self.start, batches_per_epoch(self.num_samples, g)):
            yield order[b * g : (b + 1) * g][self.rank :: self.world_size]

    def __len__(self) -> int:
        return batches_per_epoch(self.num_samples, self.global_batch) - self.start


def batch_stream(
    dataset,
    collate_fn,
    batch_size: int,
    seed: int,
    epoch: int,
    start: int,
    num_workers: int = 0,
    pin_memory=False,
    rank: int = 0,
    world_size: int = 1,
    budget=None,
):
    """Yield (epoch, global batch index, this rank's micro batch) forever, starting at data position (epoch, start).

    `batch_size` is the per-rank micro batch; see EpochBatchSampler for which samples each rank reads. A dataset
    with an `epoch_order(seed, epoch)` (a `data.Mixture`, also through `SkipBadSamples`) gives its own order.
    `budget` (a `budget.TokenBudget`, built with the same order, ranks and seed): token-budget micro batches
    instead, `batch_size` unused."""
    order = getattr(dataset, "epoch_order", None)
    while True:
        if budget is not None:
            sampler = budget.sampler(epoch, start, rank)
        else:
            sampler = EpochBatchSampler(len(dataset), batch_size, seed, epoch, start, rank, world_size, order)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=collate_fn,
            num_workers=num_workers,
            pin_memory=pin_memory,
            # Worker seeds come from this generator, not the global one, so creating a loader (each epoch, or
            # on resume mid-epoch) never shifts the global RNG stream.
            generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch),
        )
        for index, batch in enumerate(loader, start=start):
            yield epoch, index, batch
        epoch, start = epoch + 1, 0
