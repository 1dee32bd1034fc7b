"""Data sources: the records of one data file or directory, by row, wherever they are stored.

==========================  ==================================================================  =================
``data.train_path`` is      read with                                                           a record's place
==========================  ==================================================================  =================
``*.jsonl``                 our reader: one record per line, blank lines ignored                ``file:LINE``
``*.json``                  our reader: a JSON list of records                                  ``file[INDEX]``
``*.parquet``               ``datasets.Dataset.from_parquet``                                   ``file[ROW]``
a ``save_to_disk`` dir      ``datasets.load_from_disk`` (a `DatasetDict`: the split)            ``dir[split][ROW]``
any other directory         ``datasets.load_dataset(dir)``: a local copy of a Hub dataset       ``dir[split][ROW]``
                            repository (its README's configs, or its parquet/json/arrow files)
==========================  ==================================================================  =================

JSON files are parsed line by line so that one bad line is one bad record (`SampleError` in its row), not a
failed file. The `datasets`-backed sources are Arrow tables memory-mapped from the HF datasets cache (Parquet is
converted there once, `HF_DATASETS_CACHE`): a row is read when asked for, so RAM stays flat in the data set's
size, embedded images included. Rows come back as plain Python values with Image columns as ``{"bytes",
"path"}`` structs (never decoded here). Nothing is fetched from the network: a Hub dataset must be a local copy
(``huggingface-cli download --repo-type dataset NAME --local-dir DIR``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .processor import SampleError, one_line

JSON_SUFFIXES = (".jsonl", ".json")
SPLIT_PREFERENCE = {"train": ("train",), "eval": ("validation", "val", "test", "eval")}


class RecordSource:
    """The records of one data file or directory: ``len(source)``, ``source.record(row)`` (the record, or the
    `SampleError` that reading it gave) and ``source.location(row)``."""

    path: Path
    kind: str  # "jsonl", "json", "parquet", "arrow" (save_to_disk), "hub" (a local Hub dataset repository)

    def __len__(self) -> int:
        raise NotImplementedError

    def record(self, row: int) -> Any:
        raise NotImplementedError

    def location(self, row: int) -> str:
        raise NotImplementedError

    @property
    def image_root(self) -> Path:
        """Where relative image paths start: the data file's directory, or the dataset directory itself."""
        return self.path if self.path.is_dir() else self.path.parent


def open_source(path: str | Path, split: str | None = None, purpose: str = "train") -> RecordSource:
    """The source `path` names (see the table above). `split` picks a split of a dataset directory with several;
    None takes the only one, or the usual name for `purpose` ("train": train; "eval": validation, val, test)."""
    path = Path(path)
    if path.is_dir():
        return ArrowSource.from_directory(path, split, purpose)
    if path.suffix in JSON_SUFFIXES:
        return JsonSource(path)
    if path.suffix == ".parquet":
        return ArrowSource.from_parquet(path)
    raise SampleError(
        "bad_file",
        "data file must be .jsonl, .json or .parquet, or a dataset directory (save_to_disk, or a local copy of a "
        "Hub dataset repository)",
        str(path),
    )


def read_records(path: Path) -> list[tuple[str, Any]]:
    """[(location, record-or-SampleError)] in file order, for any source `open_source` reads."""
    source = open_source(path)
    return [(source.location(row), source.record(row)) for row in range(len(source))]


# ----------------------------------------------------------------------------------------------------------
# JSON Lines and JSON lists (parsed here, kept in memory)


class JsonSource(RecordSource):
    def __init__(self, path: Path):
        self.path, self.kind = path, path.suffix[1:]
        if self.kind == "jsonl":
            self._rows = _read_jsonl(path)
        else:
            self._rows = [(f"{path}[{i}]", r) for i, r in enumerate(_read_json_list(path))]

    def __len__(self) -> int:
        return len(self._rows)

    def record(self, row: int) -> Any:
        return self._rows[row][1]

    def location(self, row: int) -> str:
        return self._rows[row][0]


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as e:
        raise SampleError("bad_file", "data file not found", str(path)) from e
    except OSError as e:
        raise SampleError("bad_file", f"cannot read data file ({e})", str(path)) from e


def _parse_json(raw: bytes) -> Any:
    return json.loads(raw.decode("utf-8"))


_JSON_ERRORS = (json.JSONDecodeError, UnicodeDecodeError, RecursionError)


def _read_jsonl(path: Path) -> list[tuple[str, Any]]:
    # Lines are decoded one by one so that a bad byte sequence only spoils its own line.
    out = []
    for lineno, line in enumerate(_read_bytes(path).split(b"\n"), start=1):
        if not line.strip():
            continue
        loc = f"{path}:{lineno}"
        try:
            out.append((loc, _parse_json(line)))
        except _JSON_ERRORS as e:
            out.append((loc, SampleError("malformed_json", f"invalid JSON ({e})", loc)))
    return out


def _read_json_list(path: Path) -> list:
    try:
        data = _parse_json(_read_bytes(path))
    except _JSON_ERRORS as e:
        raise SampleError("malformed_json", f"invalid JSON ({e})", str(path)) from e
    if not isinstance(data, list):
        raise SampleError("bad_schema", "a .json data file must hold a list of records", str(path))
    return data


# ----------------------------------------------------------------------------------------------------------
# Parquet, Arrow and Hub dataset directories (Hugging Face `datasets`, memory-mapped)


def _datasets():
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # a local path never needs the network; never wait for it
    import datasets

    return datasets


class ArrowSource(RecordSource):
    """A `datasets.Dataset`, read a row at a time as Arrow (no feature decoding: images stay bytes)."""

    def __init__(self, path: Path, kind: str, dataset, split: str | None = None):
        self.path, self.kind, self.split = path, kind, split
        self._table = dataset.with_format("arrow")
        self._prefix = f"{path}[{split}]" if split is not None else str(path)

    @classmethod
    def from_parquet(cls, path: Path) -> ArrowSource:
        datasets = _datasets()
        try:
            dataset = datasets.Dataset.from_parquet(str(path))
        except Exception as e:  # pyarrow raises several types for a bad file
            why = f"cannot read as parquet ({type(e).__name__}: {one_line(e)})"
            raise SampleError("bad_file", why, str(path)) from None
        return cls(path, "parquet", dataset)

    @classmethod
    def from_directory(cls, path: Path, split: str | None, purpose: str) -> ArrowSource:
        datasets = _datasets()
        saved = (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
        try:
            if saved:
                loaded = datasets.load_from_disk(str(path))
            else:
                loaded = datasets.load_dataset(str(path))
        except Exception as e:
            if not saved and "Config name is missing" in str(e):  # a Hub repository of several subsets
                subsets = datasets.get_dataset_config_names(str(path))
                raise SampleError(
                    "bad_file",
                    f"a dataset repository with several subsets ({', '.join(subsets)}); give one subset's own "
                    f"directory as the path (e.g. {path / subsets[0]}, where its files are)",
                    str(path),
                ) from None
            how = "datasets.load_from_disk" if saved else "datasets.load_dataset"
            raise SampleError(
                "bad_file",
                f"cannot read as a dataset directory with {how} ({type(e).__name__}: {one_line(e)}); give a "
                "save_to_disk directory, a local copy of a Hub dataset repository, or a .jsonl/.json/.parquet file",
                str(path),
            ) from None
        kind = "arrow" if saved else "hub"
        if isinstance(loaded, datasets.Dataset):
            if split is not None:
                raise SampleError("bad_file", f"split {split!r} asked for, but this dataset has no splits", str(path))
            return cls(path, kind, loaded)
        chosen = _choose_split(list(loaded.keys()), split, purpose, path)
        return cls(path, kind, loaded[chosen], chosen)

    def __len__(self) -> int:
        return self._table.num_rows

    def record(self, row: int) -> Any:
        return self._table[row].to_pylist()[0]

    def location(self, row: int) -> str:
        return f"{self._prefix}[{row}]"


def _choose_split(splits: list[str], split: str | None, purpose: str, path: Path) -> str:
    key = "data.train_split" if purpose == "train" else "data.eval_split"
    if split is not None:
        if split not in splits:
            raise SampleError("bad_file", f"no split {split!r} (it has {', '.join(splits)}); fix {key}", str(path))
        return split
    if len(splits) == 1:
        return splits[0]
    for name in SPLIT_PREFERENCE[purpose]:
        if name in splits:
            return name
    raise SampleError("bad_file", f"several splits ({', '.join(splits)}); choose one with {key}=NAME", str(path))
