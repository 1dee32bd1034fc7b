"""Images of a record: resolved to a path or to embedded bytes, opened as DeepSeek-VL2's official loader does.

Validation reads headers only (`probe_image`: size and EXIF orientation, no pixels); pixels are decoded when a
sample is encoded (`load_image`). `ImageLimits` is the pixel limit of ``data.max_image_pixels`` and what to do
above it (``data.large_image``): reject (SampleError ``image_too_large``) or resize once, to fit the limit with
the aspect ratio kept, into a copy in the validation cache that every later load reads instead of the original.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import threading
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from ..model.checkpoint import write_atomic
from .processor import SampleError

log = logging.getLogger(__name__)

LARGE_IMAGE = ("reject", "resize")
# PIL's own warning threshold (Image.MAX_IMAGE_PIXELS: 0.25 GiB of 3-byte pixels, ~ 9459×9459); the model sees at
# most a 3×3 grid of 384-pixel tiles (~1.3 MP), so larger images only cost decode time and memory.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
_ORIENTATION = 0x0112
_SWAPS_SIDES = (5, 6, 7, 8)  # EXIF orientations that transpose the image (width and height swap)


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


@dataclass(frozen=True)
class ImageLimits:
    """The pixel limit (None: none) and what happens above it: ``reject`` or ``resize`` (a copy in `resized_dir`,
    made once; without a directory the image is resized in memory at every load)."""

    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
    large_image: str = "reject"
    resized_dir: Path | None = None

    def __post_init__(self):
        if self.large_image not in LARGE_IMAGE:
            raise ValueError(f"large_image must be one of {LARGE_IMAGE}, got {self.large_image!r}")

    def too_large(self, size: tuple[int, int]) -> bool:
        return self.max_pixels is not None and size[0] * size[1] > self.max_pixels

    def check(self, ref: ImageRef, size: tuple[int, int], exif_transpose: bool) -> tuple[int, int]:
        """The size the model will see: `size`, or the resized size; raises ``image_too_large`` under reject."""
        if not self.too_large(size):
            return size
        if self.large_image == "reject":
            w, h = size
            raise SampleError(
                "image_too_large",
                f"image {ref.name} has {w}×{h} = {w * h:,} pixels, above data.max_image_pixels={self.max_pixels:,}; "
                "set data.large_image=resize to shrink such images once (cached), or raise data.max_image_pixels",
            )
        self.resized(ref, exif_transpose)  # made now (once), so that training only reads it
        return fit_size(size, self.max_pixels)

    def resized(self, ref: ImageRef, exif_transpose: bool) -> Image.Image:
        """The RGB image shrunk to fit the limit: read from its copy, or made (and saved) with one warning."""
        path = self._copy_path(ref, exif_transpose)
        if path is not None and path.is_file():
            try:
                with _without_pil_limit(), Image.open(path) as im:  # (within our limit; PIL's may be lower)
                    return im.convert("RGB")
            except Exception as e:  # a damaged copy: made again
                log.warning("resized copy %s is unreadable (%s); making it again", path, e)
        try:
            image = _shrink(ref, exif_transpose, self.max_pixels)
        except SampleError:
            raise
        except Exception as e:  # (a file damaged past its header: found when resizing it at validation)
            raise SampleError("corrupt_image", f"cannot decode image {ref.name} ({type(e).__name__}: {e})") from e
        if path is not None:
            try:
                _save_atomic(image, path)
            except OSError as e:
                log.warning("cannot keep the resized copy of %s in %s (%s)", ref.name, path.parent, e)
                return image
            log.warning(
                "image %s has more than data.max_image_pixels=%s pixels: resized once to %d×%d (data.large_image="
                "resize), cached as %s",
                ref.name, f"{self.max_pixels:,}", *image.size, path,
            )  # fmt: skip
        elif _warn_once(ref, exif_transpose, self.max_pixels):
            log.warning(
                "image %s has more than data.max_image_pixels=%s pixels: resized to %d×%d at every load (no "
                "data.cache_dir to keep a copy in)",
                ref.name, f"{self.max_pixels:,}", *image.size,
            )  # fmt: skip
        return image

    def _copy_path(self, ref: ImageRef, exif_transpose: bool) -> Path | None:
        if self.resized_dir is None:
            return None
        if ref.data is not None:
            ident = ["bytes", hashlib.sha256(ref.data).hexdigest()]
        else:
            try:
                st = os.stat(ref.path)
            except OSError:
                return None
            ident = ["file", str(Path(ref.path).resolve()), st.st_size, st.st_mtime_ns]
        key = json.dumps([ident, exif_transpose, self.max_pixels])
        return self.resized_dir / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.img"  # JPEG or PNG


_warned: set = set()


def _warn_once(ref: ImageRef, *key) -> bool:
    ident = (ref.path, hashlib.sha256(ref.data).hexdigest() if ref.data is not None else None, *key)
    if ident in _warned:
        return False
    _warned.add(ident)
    return True


def fit_size(size: tuple[int, int], max_pixels: int) -> tuple[int, int]:
    """The largest size with the aspect ratio of `size` (to a pixel) and at most `max_pixels` pixels."""
    w, h = size
    scale = (max_pixels / (w * h)) ** 0.5
    nw, nh = max(1, int(w * scale)), max(1, int(h * scale))
    while nw * nh > max_pixels and nw * nh > 1:  # float rounding
        if nw >= nh:
            nw -= 1
        else:
            nh -= 1
    return nw, nh


_PIL_LIMIT_LOCK = threading.RLock()


@contextmanager
def _without_pil_limit():
    """PIL's own decompression-bomb check off: images are checked against ImageLimits instead, and the ones to
    be resized must still open."""
    with _PIL_LIMIT_LOCK:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation from the header (PNG's getexif() would decode the pixels: its eXIf chunk is read from
    `info` instead)."""
    try:
        if im.format == "PNG":
            raw = im.info.get("exif")
            if not raw:
                return 1
            exif = Image.Exif()
            exif.load(raw)
        else:
            exif = im.getexif()
        value = exif.get(_ORIENTATION, 1)
        return int(value) if isinstance(value, int) else 1
    except Exception:  # an unreadable EXIF block is no orientation, as ImageOps.exif_transpose treats it
        return 1


def probe_header(image: Path | ImageRef) -> tuple[int, int, int]:
    """(width, height, EXIF orientation) as stored, from the header only (no pixels are decoded); failures
    become SampleErrors by kind. PIL's decompression-bomb check is off (ImageLimits decides)."""
    ref = image if isinstance(image, ImageRef) else ImageRef(Path(image))
    try:
        with _without_pil_limit(), _open(ref) as im:
            w, h = im.size
            return w, h, _orientation(im)
    except SampleError:
        raise
    except Exception as e:
        raise SampleError("corrupt_image", f"cannot read image {ref.name} ({type(e).__name__}: {e})") from e


def oriented_size(header: tuple[int, int, int], exif_transpose: bool) -> tuple[int, int]:
    w, h, orientation = header
    return (h, w) if exif_transpose and orientation in _SWAPS_SIDES else (w, h)


def probe_image(image: Path | ImageRef, exif_transpose: bool = False) -> tuple[int, int]:
    """The (width, height) `load_image` would return, from the header only (rotated sides swapped for EXIF
    orientations 5-8 with `exif_transpose`)."""
    return oriented_size(probe_header(image), exif_transpose)


def load_image(image: Path | ImageRef, exif_transpose: bool = False, limits: ImageLimits | None = None) -> Image.Image:
    """Open and decode to RGB, as DeepSeek-VL2's official loader (`Image.open(p).convert("RGB")`); with
    `exif_transpose`, rotated by the EXIF orientation tag first. With `limits`, an image above the pixel limit is
    rejected or read from its resized copy (PIL's own bomb check is then off); without, PIL's check applies.
    Failures become SampleErrors by kind."""
    ref = image if isinstance(image, ImageRef) else ImageRef(Path(image))
    try:
        with _without_pil_limit() if limits is not None else nullcontext(), _open(ref) as im:
            size = oriented_size((*im.size, _orientation(im)), exif_transpose) if limits is not None else None
            if size is None or not limits.too_large(size):  # (the header is read; the pixels decode only here)
                return _decode(im, exif_transpose)
        limits.check(ref, size, exif_transpose)  # raises under reject
        return limits.resized(ref, exif_transpose)
    except SampleError:
        raise
    except Exception as e:  # PIL raises many types for bad files (OSError, SyntaxError, DecompressionBomb...)
        raise SampleError("corrupt_image", f"cannot decode image {ref.name} ({type(e).__name__}: {e})") from e


def _decode(im: Image.Image, exif_transpose: bool) -> Image.Image:
    if exif_transpose:
        im = ImageOps.exif_transpose(im)
    return im.convert("RGB")  # convert() decodes the whole image, so truncation shows up here


def _shrink(ref: ImageRef, exif_transpose: bool, max_pixels: int) -> Image.Image:
    """Decode `ref` (rotated with `exif_transpose`) and shrink it to fit `max_pixels`, the aspect ratio kept."""
    with _without_pil_limit(), _open(ref) as im:
        orientation = _orientation(im)
        fmt, swap = im.format, exif_transpose and orientation in _SWAPS_SIDES
        target = fit_size(oriented_size((*im.size, orientation), exif_transpose), max_pixels)
        im.draft("RGB", (target[1], target[0]) if swap else target)  # JPEG: decode at 1/2..1/8 scale, ≥ target
        if exif_transpose:
            im = ImageOps.exif_transpose(im)
        image = im.convert("RGB").resize(target, Image.Resampling.LANCZOS)
        image.format = fmt  # what the copy is saved as (JPEG stays JPEG; anything else becomes PNG)
        return image


def _save_atomic(image: Image.Image, path: Path) -> None:
    buf = io.BytesIO()
    if image.format == "JPEG":
        image.save(buf, format="JPEG", quality=95)
    else:
        image.save(buf, format="PNG")
    write_atomic(path, buf.getvalue())


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
