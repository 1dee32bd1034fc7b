"""A checkpoint's `manifest.json`: the size and SHA-256 of every other file in it, written last.

    write_manifest(directory)           # after every file of the checkpoint is written
    problems = verify_manifest(directory)   # [] when intact, else one "file: what is wrong" per problem

A checkpoint is intact when its manifest parses, every file it lists is there with that size and checksum, and
no file it does not list is there. A missing manifest means the checkpoint was cut short or was not written by
this code: it is not intact either. Only intact checkpoints are ever loaded (train_state.find_resume_checkpoint),
which is what keeps DeepSpeed's pickle loading to files this code wrote.

A checkpoint written before manifests existed can be vouched for by hand (its files are then trusted as they are):

    python -m deepseek_vl2_lora.manifest <run dir>/checkpoints/step_XXXXXXXX      # writes its manifest.json
    python -m deepseek_vl2_lora.manifest --verify <checkpoint dir>                # exit 1 if damaged
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST_FILE = "manifest.json"
_CHUNK = 8 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(directory: Path) -> list[str]:
    """Every regular file under `directory` except the manifest, as sorted POSIX paths relative to it."""
    found = (p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file() or p.is_symlink())
    return sorted(name for name in found if name != MANIFEST_FILE)


def write_manifest(directory: Path) -> Path:
    directory = Path(directory)
    files = {
        name: {"size": (directory / name).stat().st_size, "sha256": sha256_file(directory / name)}
        for name in _files(directory)
    }
    path = directory / MANIFEST_FILE
    path.write_text(json.dumps({"version": 1, "algorithm": "sha256", "files": files}, indent=1) + "\n")
    return path


def verify_manifest(directory: Path) -> list[str]:
    """What is wrong with the checkpoint in `directory`, one "file: problem" string each ([] = intact)."""
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    if not path.is_file():
        return [
            f"{MANIFEST_FILE}: missing (the save was cut short, or an older version wrote it: to trust it as it is, "
            f"python -m deepseek_vl2_lora.manifest {directory})"
        ]
    try:
        files = json.loads(path.read_text())["files"]
        expected = {name: (int(e["size"]), str(e["sha256"])) for name, e in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        return [f"{MANIFEST_FILE}: unreadable ({type(e).__name__}): truncated or damaged"]
    problems = []
    for name, (size, checksum) in expected.items():
        file = directory / name
        if not file.is_file():
            problems.append(f"{name}: missing")
            continue
        actual = file.stat().st_size
        if actual != size:
            what = "empty" if actual == 0 else ("truncated" if actual < size else "longer than written")
            problems.append(f"{name}: {what} ({actual} bytes, {size} written)")
        elif sha256_file(file) != checksum:
            problems.append(f"{name}: checksum mismatch (the contents changed since it was written)")
    problems += [f"{name}: not in the manifest" for name in _files(directory) if name not in expected]
    return problems
