"""A training mixture (``data.train``): several sources, each sampled by its weight, in an order that is a function
of (seed, epoch) only.

The mixture is the concatenation of its sources (global index = the source's offset + its own index); an epoch
has N = Σ n_s draws, n_s the records a source uses (kept by validation, then its ``limit``). Source s gets exactly
c_s of them, the largest-remainder rounding of N·w_s/Σw (so 3:1 is exact up to one draw). A source's draws walk
an endless stream of permutations of its records: draw k (counted from the start of training, k = epoch·c_s + j)
is ``perm_{s,p}[k mod n_s]`` with p = k // n_s and ``perm_{s,p}`` a randperm seeded by (seed, s, p). So an
up-weighted small source repeats its records evenly (each ⌊c_s/n_s⌋ or ⌈c_s/n_s⌉ times in an epoch), and a
down-weighted large one is covered over the epochs before any record repeats. The epoch's N draws are then shuffled
by the single-source order `sampling.epoch_order(N, seed, epoch)`.

Everything depends on (seed, epoch, the sources' sizes and weights) only: a resumed run rebuilds the same order
(the checkpoint records the sizes and weights, `Mixture.signature`, and a resume with others is refused).
"""

from __future__ import annotations

import bisect
from fractions import Fraction
from pathlib import Path

import torch

from .sampling import epoch_order

_PRIME = 1_000_003


def largest_remainder(total: int, weights: list[float]) -> list[int]:
    """`total` split in proportion to `weights` (exact arithmetic): the floors of the quotas, then one more each
    for the largest remainders (ties: the earlier source)."""
    exact = [Fraction(w) for w in weights]
    quotas = [total * w / sum(exact) for w in exact]
    counts = [int(q) for q in quotas]
    by_remainder = sorted(range(len(quotas)), key=lambda s: (-(quotas[s] - counts[s]), s))
    for s in by_remainder[: total - sum(counts)]:
        counts[s] += 1
    return counts


def source_names(specs: list[dict]) -> list[str]:
    """Each source's name: its `name`, else its file's stem (a directory's name), made unique with `_<index>`."""
    explicit = {spec["name"] for spec in specs if spec.get("name")}
    names = []
    for i, spec in enumerate(specs):
        name = spec.get("name")
        if not name:
            path = Path(spec["path"])
            name = path.name if path.is_dir() or not path.suffix else path.stem
            if name in explicit or name in names:
                name = f"{name}_{i}"
        names.append(name)
    return names


def _permutation(n: int, seed: int, source: int, pass_: int) -> list[int]:
    key = (seed * _PRIME * _PRIME + (source + 1) * _PRIME + pass_) % 2**63
    return torch.randperm(n, generator=torch.Generator().manual_seed(key)).tolist()


class Mixture(torch.utils.data.Dataset):
    """Sources (name, dataset, weight) as one training set; `epoch_order(seed, epoch)` is its sampler's order."""

    def __init__(self, names: list[str], datasets: list, weights: list[float]):
        if not (len(names) == len(datasets) == len(weights)) or not names:
            raise ValueError("a mixture needs one name, dataset and weight per source, and at least one source")
        if any(len(d) == 0 for d in datasets):
            raise ValueError("every source of a mixture needs at least one record")
        self.names, self.datasets, self.weights = list(names), list(datasets), [float(w) for w in weights]
        self.sizes = [len(d) for d in datasets]
        self.offsets = [sum(self.sizes[:s]) for s in range(len(self.sizes))]
        self.draws = largest_remainder(sum(self.sizes), self.weights)  # per source, per epoch

    def __len__(self) -> int:
        return sum(self.sizes)

    def locate(self, index: int) -> tuple[int, int]:
        """(source, index within the source) of a global index."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} is outside the mixture's {len(self)} records")
        source = bisect.bisect_right(self.offsets, index) - 1
        return source, index - self.offsets[source]

    def source_name(self, index: int) -> str:
        return self.names[self.locate(index)[0]]

    def __getitem__(self, index: int):
        source, i = self.locate(index)
        return self.datasets[source][i]

    def epoch_order(self, seed: int, epoch: int) -> list[int]:
        """The global indices epoch `epoch` visits, in order (N of them; see the module docstring)."""
        draws = []
        for s, (n, c) in enumerate(zip(self.sizes, self.draws)):
            first, last = epoch * c, (epoch + 1) * c  # this epoch's draws of source s, counted from the start
            for p in range(first // n, -(-last // n)):
                perm = _permutation(n, seed, s, p)
                lo, hi = max(first - p * n, 0), min(last - p * n, n)
                draws += [self.offsets[s] + i for i in perm[lo:hi]]
        return [draws[i] for i in epoch_order(len(draws), seed, epoch)]

    def describe(self) -> list[dict]:
        """Per source: name, records used, weight, draws per epoch and their share of the epoch."""
        total = len(self)
        return [
            {"name": name, "records": n, "weight": w, "draws_per_epoch": c, "share": c / total}
            for name, n, w, c in zip(self.names, self.sizes, self.weights, self.draws)
        ]

    def signature(self) -> list[dict]:
        """What the order depends on besides (seed, epoch): each source's name, size and weight (for resume)."""
        return [{"name": name, "records": n, "weight": w} for name, n, w in zip(self.names, self.sizes, self.weights)]
