"""The validation cache: what validating a data source found, kept on disk so that a restart, a resume and the
other ranks of a run validate nothing again.

Two levels, both under ``data.cache_dir`` (default ``$DEEPSEEK_VL2_LORA_DATA_CACHE``, else
``$DEEPSEEK_VL2_LORA_CACHE/data``, else ``$XDG_CACHE_HOME/deepseek_vl2_lora/data``, else
``~/.cache/deepseek_vl2_lora/data``; ``false`` or ``none`` turns it off):

* ``images/XX.json``: per image file, keyed by (resolved path, size, mtime_ns), its header (width, height, EXIF
  orientation) or the SampleError reading it gave. Sharded by a hash of the path; any setting can use it.
* ``sources/KEY.json``: per data source and validation settings (KEY hashes each data file's path, size and
  mtime_ns, the processor's files, and every option that changes the outcome), every row's outcome (kept, with
  the placeholders added and its token length; or skipped, with its reason and message), the layout, and the
  (path, size, mtime_ns) of every image file the rows named. A second start re-reads this and stats the images:
  an image that changed sends only the records naming it through validation again.
* ``resized/``: the copies of images shrunk to ``data.max_image_pixels`` (``data.large_image=resize``).

Several ranks: the node's local rank 0 validates and writes the entry (``sources/KEY.pending`` shows it is at
work, touched every few seconds); the other local ranks wait for the entry and read it, decoding nothing. The
local rank, not the global one, so that a cache directory local to each node never leaves a node waiting for a
rank elsewhere (with a shared directory, each node's rank 0 validates and the entries written are the same).
A waiting rank gives up with a clear message when the validating one shows no progress for `WAIT_STALL_S`.

Writes are atomic (a temporary file, then os.replace) with the mode the umask gives; an unreadable or corrupt
entry is a miss and one warning, never an error. Nothing is ever deleted: ``rm -rf`` the directory to reclaim it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from ..model.checkpoint import write_atomic
from .images import ImageRef, probe_header
from .processor import SampleError, one_line

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # part of every key: a change in what validation checks must bump it (2: token lengths)
WAIT_STALL_S = 600.0  # a waiting rank gives up when the validating rank has shown no progress for this long
HEARTBEAT_S = 2.0
# A file modified less than this before it was read may change again within its mtime's granularity (a coarse
# kernel clock, 2 s on FAT) without its stamp changing ("racy git"): its header is not cached, and a source entry
# naming it serves only the ranks waiting for it, never a later start.
RACY_NS = 1_000_000_000
_POLL_S = 0.2
_DISABLED = (False, "false", "none", "off", "")


def default_cache_dir() -> Path:
    env = os.environ
    if env.get("DEEPSEEK_VL2_LORA_DATA_CACHE"):
        return Path(env["DEEPSEEK_VL2_LORA_DATA_CACHE"]).expanduser()
    if env.get("DEEPSEEK_VL2_LORA_CACHE"):
        return Path(env["DEEPSEEK_VL2_LORA_CACHE"]).expanduser() / "data"
    base = Path(env["XDG_CACHE_HOME"]).expanduser() if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "deepseek_vl2_lora" / "data"


def resolve_cache_dir(value: Any) -> Path | None:
    """``data.cache_dir``: None -> the default directory; false / "none" -> None (no cache); else the path."""
    if value is None:
        return default_cache_dir()
    if isinstance(value, str) and value.strip().lower() in _DISABLED or value is False:
        return None
    return Path(str(value)).expanduser()


def file_stamp(path: Path | str) -> list | None:
    """[resolved path, size, mtime_ns], or None when it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


def is_racy(stamps, read_ns: int) -> bool:
    """Whether any of `stamps` was modified too shortly before `read_ns` for its stamp to be trusted."""
    return any(s is not None and s[2] is not None and s[2] > read_ns - RACY_NS for s in stamps)


def source_fingerprint(path: Path) -> list:
    """The stamps of a data file, or of every file in a dataset directory (sorted)."""
    if not path.is_dir():
        return [file_stamp(path)]
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return [file_stamp(p) for p in files]


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:32]


def read_json(path: Path) -> Any | None:
    """The JSON in `path`; None when it is absent, or unreadable (one warning: the entry is then rebuilt)."""
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable validation cache entry %s (%s); it will be rebuilt", path, one_line(e))
        return None


# ------------------------------------------------------------------------------------------------ images
class ImageCache:
    """Image headers by (path, size, mtime_ns), on disk (with a root) and, while a data set validates, in memory.
    One per cache directory in a process (`image_cache`): the eval file's second dataset reads the first one's
    headers from memory."""

    def __init__(self, root: Path | None):
        self.root = root
        self._shards: dict[str, dict] = {}
        self._dirty: set[str] = set()
        self._used: dict[str, dict] = {}  # the entries looked up since the last release()
        self._recent: dict[str, dict] = {}  # the ones before (the eval file's second dataset reads these)

    def header(self, ref: ImageRef, stamp: list | None) -> tuple[int, int, int]:
        """(width, height, orientation) of an image file whose stamp is `stamp`; raises its SampleError."""
        if ref.data is not None or stamp is None:  # embedded, or missing: nothing to key on
            return probe_header(ref)
        path, size, mtime = stamp
        if mtime > time.time_ns() - RACY_NS:
            return probe_header(ref)

        def fresh(entry) -> bool:
            return isinstance(entry, dict) and entry.get("size") == size and entry.get("mtime_ns") == mtime

        entry = self._recent.get(path)
        if not fresh(entry):
            name = hashlib.sha1(path.encode("utf-8", "surrogateescape")).hexdigest()[:2]
            shard = self._shard(name)
            entry = shard.get(path)
            if not fresh(entry):
                try:
                    entry = {"size": size, "mtime_ns": mtime, "header": list(probe_header(ref))}
                except SampleError as e:
                    entry = {"size": size, "mtime_ns": mtime, "error": [e.reason, e.message]}
                shard[path] = entry
                self._dirty.add(name)
        self._used[path] = entry
        if "error" in entry:
            raise SampleError(*entry["error"])
        return tuple(entry["header"])

    def _shard(self, name: str) -> dict:
        if name not in self._shards:
            loaded = read_json(self.root / "images" / f"{name}.json") if self.root is not None else None
            self._shards[name] = loaded if isinstance(loaded, dict) else {}
        return self._shards[name]

    def release(self) -> None:
        """Write what changed and drop the shards from memory (a large data set's headers would otherwise stay in
        the training process and its loader workers), keeping the entries the last data set used."""
        self.flush()
        self._shards.clear()
        self._recent, self._used = self._used, {}

    def flush(self) -> None:
        """Write the shards this process changed (merged with what other processes wrote meanwhile)."""
        if self.root is None:
            self._dirty.clear()
            return
        for name in sorted(self._dirty):
            path = self.root / "images" / f"{name}.json"
            on_disk = read_json(path)
            merged = {**(on_disk if isinstance(on_disk, dict) else {}), **self._shards[name]}
            try:
                write_atomic(path, json.dumps(merged, separators=(",", ":")))
            except OSError as e:
                log.warning("cannot write the image validation cache %s (%s)", path, one_line(e))
                break
        self._dirty.clear()


_IMAGE_CACHES: dict[Path | None, ImageCache] = {}


def image_cache(root: Path | None) -> ImageCache:
    if root not in _IMAGE_CACHES:
        _IMAGE_CACHES[root] = ImageCache(root)
    return _IMAGE_CACHES[root]


# ------------------------------------------------------------------------------------------------ sources
def is_validator() -> bool:
    """Whether this process validates and writes the cache: local rank 0 (or no launcher)."""
    return int(os.environ.get("LOCAL_RANK", "0") or 0) == 0


class SourceEntry:
    """The cache entry of one data source under one set of validation settings (`key`)."""

    def __init__(self, root: Path, key: str):
        self.path = root / "sources" / f"{key}.json"
        self.pending = self.path.with_suffix(".pending")
        self.failed = self.path.with_suffix(".failed")
        self._beat = 0.0

    def load(self, accept_racy: bool = False) -> dict | None:
        """The entry; None when absent, unreadable, or (unless `accept_racy`: the ranks waiting for this run's
        validation) written from a file modified just before it was read."""
        entry = read_json(self.path)
        if entry is None:
            return None
        if not (isinstance(entry, dict) and entry.get("version") == CACHE_VERSION and "outcomes" in entry):
            log.warning("ignoring validation cache entry %s of another format; it will be rebuilt", self.path)
            return None
        if entry.get("racy") and not accept_racy:
            return None
        return entry

    def save(self, entry: dict) -> None:
        try:
            write_atomic(self.path, json.dumps({"version": CACHE_VERSION, **entry}, separators=(",", ":")))
        except OSError as e:
            log.warning("cannot write the validation cache %s (%s)", self.path, one_line(e))

    # -- the validating rank's signals to the waiting ones
    def start(self) -> None:
        try:
            self.failed.unlink(missing_ok=True)
        except OSError:
            pass
        self.heartbeat(force=True)

    def heartbeat(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._beat >= HEARTBEAT_S:
            self._beat = now
            try:
                self.pending.parent.mkdir(parents=True, exist_ok=True)
                self.pending.touch()
            except OSError:
                pass

    def finish(self, error: SampleError | None = None) -> None:
        if error is not None:
            try:
                write_atomic(self.failed, json.dumps([error.reason, error.message, error.location]))
            except OSError:
                pass
        try:
            self.pending.unlink(missing_ok=True)
        except OSError:
            pass

    def wait(self, stall_s: float | None = None) -> dict:
        """The entry local rank 0 is writing, once written; its SampleError if it failed; a RuntimeError naming
        the entry when nothing progressed for `stall_s` seconds."""
        stall_s = WAIT_STALL_S if stall_s is None else stall_s
        start = time.time()
        log.info("waiting for local rank 0 to validate the data (%s)", self.path)
        while True:
            entry = self.load(accept_racy=True)
            if entry is not None:
                return entry
            failed = _mtime(self.failed)
            if failed is not None and failed >= start - 120:
                raw = read_json(self.failed)
                if isinstance(raw, list) and len(raw) == 3:
                    raise SampleError(*raw)
                raise SampleError("validation_failed", "local rank 0 failed to validate this data (see its log)")
            last = max(_mtime(self.pending) or 0.0, start)
            if time.time() - last > stall_s:
                raise RuntimeError(
                    f"waited {time.time() - start:.0f} s for local rank 0 to validate the data and write "
                    f"{self.path}, with no progress for {stall_s:.0f} s; check rank 0's log (did it fail?), and that "
                    "data.cache_dir is writable by it and readable here"
                )
            time.sleep(_POLL_S)


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None
