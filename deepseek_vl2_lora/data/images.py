"""Images of a record: resolved to a path or to embedded bytes, opened as DeepSeek-VL2's official loader does."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from ..processor import SampleError


@dataclass(frozen=True)
class ImageRef:
    """One image of a record: a file (`path`) or bytes embedded in the data (`data`; `path` is then only the name
    the data gave it, if any, for messages)."""

    path: Path | None
    data: bytes | None = None

    @property
    def name(self) -> str:
        if self.data is None:
            return str(self.path)
        return f"embedded image {self.path}" if self.path is not None else "embedded image"


def resolve_image(image: str | dict | Path | ImageRef, root: Path) -> ImageRef:
    """A record's image (a path string relative to `root`, or a ``{"bytes", "path"}`` struct) as an ImageRef."""
    if isinstance(image, ImageRef):
        return image
    if isinstance(image, (str, Path)):
        return ImageRef(root / image)
    data, path = image.get("bytes"), image.get("path")
    if data is not None:
        return ImageRef(Path(path) if path else None, bytes(data))
    return ImageRef(root / path)


def load_image(image: Path | ImageRef, exif_transpose: bool = False) -> Image.Image:
    """Open and decode to RGB, as DeepSeek-VL2's official loader (`Image.open(p).convert("RGB")`); with
    `exif_transpose`, rotated by the EXIF orientation tag first. Failures become SampleErrors by kind."""
    ref = image if isinstance(image, ImageRef) else ImageRef(Path(image))
    try:
        with _open(ref) as im:
            if exif_transpose:
                im = ImageOps.exif_transpose(im)
            return im.convert("RGB")  # convert() decodes the whole image, so truncation shows up here
    except SampleError:
        raise
    except Exception as e:  # PIL raises many types for bad files (OSError, SyntaxError, DecompressionBomb...)
        raise SampleError("corrupt_image", f"cannot decode image {ref.name} ({type(e).__name__}: {e})") from e


def _open(ref: ImageRef) -> Image.Image:
    """Image.open on the file or the bytes (the header only: pixels decode later); missing and empty files are
    SampleErrors of their own kinds."""
    if ref.data is not None:
        return Image.open(io.BytesIO(ref.data))
    path = ref.path
    if not path.is_file():  # is_file() is False (not an exception) for unrepresentable paths too
        raise SampleError("missing_image", f"image not found: {path}")
    try:
        if os.path.getsize(path) == 0:
            raise SampleError("empty_image", f"image file is empty: {path}")
    except OSError as e:
        raise SampleError("missing_image", f"cannot access image {path} ({e})") from e
    return Image.open(path)
