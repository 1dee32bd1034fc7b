"""Checkpoint shards of a bounded size, as the Hub and the official release lay them out.

`plan_shards` cuts the official keys, in the order the official model holds them, into files of at most
`max_shard_size` bytes with huggingface_hub's splitter (`split_state_dict_into_shards_factory`, fed sizes from
shapes and dtypes rather than tensors: its torch variant groups tensors by storage, and our per-expert weights are
views of one stacked tensor, which it would take for tied weights and put in one shard whatever its size).
Names and index follow the Hub: `model.safetensors` alone, or `model-0000i-of-0000N.safetensors` with
`model.safetensors.index.json` ({"metadata": {"total_size"}, "weight_map"}).

`ShardWriter` writes those files tensor by tensor, in any order, without holding a shard in memory: every shape
and dtype is known up front, so each file gets its safetensors header first and each tensor's bytes go straight to
their offset (the streaming merge feeds it one base shard at a time).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"  # the Hub's default (transformers, huggingface_hub)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def parse_shard_size(size: int | str) -> int:
    """Bytes in an HF-style size: an int, or "5GB", "500MB", "2GiB" (GB = 10^9 as on the Hub; GiB = 2^30)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(size))
        unit = m and m.group(2).upper()
        if not m or unit not in _UNITS:
            raise ValueError(f"shard size {size!r}: expected bytes or a size like 5GB, 500MB or 2GiB")
        value = int(float(m.group(1)) * _UNITS[unit])
    if value < 1:
        raise ValueError(f"shard size {size!r}: must be at least one byte")
    return value


def read_header(path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype, int]]:
    """{key: (shape, dtype, offset of its data)} of a safetensors file, from its header (no tensor data read)."""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    names = {v: k for k, v in _DTYPES.items()}
    return {
        key: (tuple(entry["shape"]), names[entry["dtype"]], entry["data_offsets"][0])
        for key, entry in header.items()
        if key != "__metadata__"
    }


def nbytes(shape, dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n * torch.empty((), dtype=dtype).element_size()


def plan_shards(specs: dict[str, tuple[tuple, torch.dtype]], max_shard_size: int | str) -> dict[str, list[str]]:
    """{file name: keys} for `specs` ({key: (shape, dtype)}, in the order to keep): consecutive keys fill a file
    until the next would pass `max_shard_size` (a tensor larger than that gets a file of its own)."""
    from huggingface_hub import split_state_dict_into_shards_factory

    split = split_state_dict_into_shards_factory(
        dict(specs),
        get_storage_size=lambda spec: nbytes(*spec),
        filename_pattern="model{suffix}.safetensors",
        max_shard_size=parse_shard_size(max_shard_size),
    )
    return split.filename_to_tensors


def write_index(out: Path, files: dict[str, list[str]], total_size: int) -> None:
    """The index of a sharded checkpoint (none for a single file), keys sorted as the Hub writes them."""
    if len(files) <= 1:
        return
    weight_map = {k: name for name, keys in files.items() for k in keys}
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


class ShardWriter:
    """Safetensors files for `specs` ({key: (shape, dtype)}, official order) cut as `plan_shards` says, written
    tensor by tensor (`write`, any order) straight to their offsets; `close` checks that every tensor came and
    writes the index. File modes follow the umask."""

    def __init__(self, out: Path, specs: dict, max_shard_size: int | str, metadata: dict | None = None):
        self.out = Path(out)
        self.specs = dict(specs)
        self.files = plan_shards(self.specs, max_shard_size)
        self.place: dict[str, tuple[int, int]] = {}  # key -> (fd, absolute offset)
        self.fds: list[int] = []
        self.written: set[str] = set()
        try:
            for name, keys in self.files.items():
                self._open(self.out / name, sorted(keys), metadata or {"format": "pt"})
        except BaseException:
            self._close_fds()
            raise

    def _open(self, path: Path, keys: list[str], metadata: dict) -> None:
        header, offset = {"__metadata__": metadata}, 0
        for key in keys:
            shape, dtype = self.specs[key]
            size = nbytes(shape, dtype)
            header[key] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        head = json.dumps(header, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # open() honours the umask
        self.fds.append(fd)
        start = 8 + len(head)
        _pwrite_all(fd, len(head).to_bytes(8, "little") + head, 0)
        os.ftruncate(fd, start + offset)
        for key in keys:
            self.place[key] = (fd, start + header[key]["data_offsets"][0])

    def write(self, key: str, tensor: torch.Tensor) -> None:
        shape, dtype = self.specs[key]
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise ValueError(f"{key}: got {tuple(tensor.shape)} {tensor.dtype}, the plan has {tuple(shape)} {dtype}")
        if key in self.written:
            raise ValueError(f"{key} written twice")
        fd, offset = self.place[key]
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        _pwrite_all(fd, memoryview(data), offset)
        self.written.add(key)

    def close(self) -> dict[str, list[str]]:
        """Check that every planned tensor was written, flush, write the index; returns {file: keys}."""
        try:
            missing = self.specs.keys() - self.written
            if missing:
                raise ValueError(f"{len(missing)} tensors never written, e.g. {sorted(missing)[:5]}")
            for fd in self.fds:
                os.fsync(fd)
        finally:
            self._close_fds()
        write_index(self.out, self.files, sum(nbytes(*spec) for spec in self.specs.values()))
        return self.files

    def abort(self) -> None:
        """Close the files without checks or index (the caller discards the directory)."""
        self._close_fds()

    def _close_fds(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n
