"""DeepSeek-VL2 processor: anyres tiling, the `deepseek` chat template, SFT labels and batching.

The token stream reproduces the official `DeepseekVLV2Processor` (`format_messages_v2`, `tokenize_with_images`
and `process_one(inference_mode=False)`) token for token:

* bos once at the start;
* a system message (only allowed first) is its stripped text, tokenized on its own, with no separator
  after it;
* a user turn is the text ``"<|User|>: {content.strip()}\\n\\n<|Assistant|>:"`` split at every ``<image>``;
  each text piece is tokenized on its own and every ``<image>`` becomes ``num_image_tokens(tw, th)`` image
  tokens (an empty user content renders as ``"<|User|>:<|Assistant|>:"``, as the official template does);
* an assistant turn is ``content.strip()`` tokenized on its own (no leading space) followed by eos.

Labels keep the assistant tokens and their eos; everything else is ``ignore_id``. The official code leaves
the bos id in ``target_ids[0]``; we set it to ``ignore_id``, which changes nothing because the causal-LM loss
shifts the labels and never reads position 0.

Images are tiled as in the official code: the best candidate resolution is chosen only when the conversation
holds at most two images (otherwise one local tile), a global view is padded to the tile size with the mean
colour, the local view is padded to the best resolution and cut row-major into tiles.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from ..model.tokenizer import CHAT_TOKENS, GROUNDING_TOKENS, IMAGE_TOKEN, PAD_TOKEN

PROCESSOR_CONFIG_NAME = "processor_config.json"
USER_ROLES = ("user", "<|User|>")
ASSISTANT_ROLES = ("assistant", "<|Assistant|>")
SYSTEM_ROLES = ("system",)
OVERLONG_POLICIES = ("error", "skip", "truncate")


class SampleError(ValueError):
    """A sample that cannot be encoded. `reason` is a short machine-readable key used for skip counting."""

    def __init__(self, reason: str, message: str, location: str | None = None):
        self.reason = reason
        self.message = message
        self.location = location
        prefix = f"{location}: " if location else ""
        super().__init__(f"{prefix}{message} [{reason}]")

    def at(self, location: str) -> SampleError:
        """The same error, attributed to a data file position (e.g. ``train.jsonl:17``)."""
        return SampleError(self.reason, self.message, location)


class ProcessorConfigError(ValueError):
    """processor_config.json or the tokenizer next to it is missing or invalid."""


def one_line(error: BaseException) -> str:
    """An exception's message on one line (library errors often span several), for one-line user errors."""
    return " ".join(str(error).split())


# ----------------------------------------------------------------------------------------------------------
# Config


def candidate_resolutions(image_size: int, candidate_grid: int = 9) -> list[list[int]]:
    """All [image_size*m, image_size*n] with m*n <= candidate_grid, in the order of the released configs.

    The released list (for 384 and grid 9) is sorted by tile count m*n, then puts the thin layouts first
    (smaller min(m, n)), then the narrower one (smaller m) first: [1,1], [1,2], [2,1], [1,3], [3,1], [1,4],
    [4,1], [2,2], ...
    """
    sides = range(1, candidate_grid + 1)
    grids = [(m, n) for m in sides for n in sides if m * n <= candidate_grid]
    grids.sort(key=lambda mn: (mn[0] * mn[1], min(mn), mn[0]))
    return [[image_size * m, image_size * n] for m, n in grids]


def image_token_count(image_size: int, patch_size: int, downsample_ratio: int, width_tiles: int, height_tiles: int):
    """Tokens of one image: global view rows + newlines, one view separator, local grid rows + newlines."""
    h = w = math.ceil((image_size // patch_size) / downsample_ratio)
    return h * (w + 1) + 1 + (h * height_tiles) * (w * width_tiles + 1)


def write_processor_config(
    out_dir: str | Path,
    image_size: int,
    patch_size: int,
    downsample_ratio: int = 2,
    candidate_grid: int = 9,
    **overrides: Any,
) -> Path:
    """Write a processor_config.json shaped like the released one; return its path."""
    config = {
        "processor_class": "DeepseekVLV2Processor",
        "candidate_resolutions": candidate_resolutions(image_size, candidate_grid),
        "patch_size": patch_size,
        "downsample_ratio": downsample_ratio,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "normalize": True,
        "image_token": IMAGE_TOKEN,
        "pad_token": PAD_TOKEN,
        "add_special_token": False,
        "sft_format": "deepseek",
        "ignore_id": -100,
        # The released file most likely says false here. It does not matter for us: `encode` always masks the
        # prompt (SFT masking is forced through its `mask_prompt=True` argument, not read from this file).
        "mask_prompt": True,
    }
    config.update(overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / PROCESSOR_CONFIG_NAME
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def _is_pos_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def _validate_config(config: Any, path: Path) -> dict:
    """Check the keys the processor depends on; every message names the file."""

    def fail(msg: str) -> ProcessorConfigError:
        return ProcessorConfigError(f"{path}: {msg}")

    if not isinstance(config, dict):
        raise fail("expected a JSON object")
    for key in ("candidate_resolutions", "patch_size", "downsample_ratio"):
        if key not in config:
            raise fail(f"missing required key {key!r}")
    res = config["candidate_resolutions"]
    if not isinstance(res, list) or not res:
        raise fail("'candidate_resolutions' must be a non-empty list of [width, height]")
    for pair in res:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(_is_pos_int(v) for v in pair)):
            raise fail(f"bad entry in 'candidate_resolutions': {pair!r}")
    tile = res[0][0]
    if any(w % tile or h % tile for w, h in res):
        raise fail(f"every candidate resolution must be a multiple of the tile size {tile}")
    for key in ("patch_size", "downsample_ratio"):
        if not _is_pos_int(config[key]):
            raise fail(f"{key!r} must be a positive integer, got {config[key]!r}")
    for key in ("image_mean", "image_std"):
        val = config.get(key, [0.5, 0.5, 0.5])
        if not (isinstance(val, list) and len(val) == 3 and all(isinstance(v, (int, float)) for v in val)):
            raise fail(f"{key!r} must be a list of 3 numbers")
    if config.get("sft_format", "deepseek") != "deepseek":
        raise fail(f"only sft_format 'deepseek' is supported, got {config['sft_format']!r}")
    return config


# ----------------------------------------------------------------------------------------------------------
# Images


def select_best_resolution(image_size: tuple[int, int], resolutions: list[list[int]]) -> tuple[int, int]:
    """Anyres choice (LLaVA-NeXT rule, as in the official processor).

    Each candidate (w, h) is scored by how many original pixels survive an aspect-preserving fit into it; the
    highest score wins and ties go to the candidate with the least unused area. Candidates are visited in
    config order and only strictly better ones replace the current choice.
    """
    width, height = image_size
    best, best_effective, best_wasted = None, -1, math.inf
    for cand_w, cand_h in resolutions:
        scale = min(cand_w / width, cand_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = cand_w * cand_h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (cand_w, cand_h), effective, wasted
    return best


def image_to_tensor(image: Image.Image, mean, std, normalize: bool = True) -> torch.Tensor:
    """ToTensor + Normalize(mean, std) with torchvision's arithmetic: uint8 -> float32 / 255, then (x-m)/s."""
    x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()
    x = x.to(torch.float32).div(255)
    if normalize:
        m = torch.as_tensor(mean, dtype=torch.float32)[:, None, None]
        s = torch.as_tensor(std, dtype=torch.float32)[:, None, None]
        x = x.sub(m).div(s)
    return x


# ----------------------------------------------------------------------------------------------------------
# Encoding plan (token layout without pixels: cheap enough to validate a whole dataset up front)


@dataclass
class _Plan:
    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    images_seq_mask: list[bool] = field(default_factory=list)
    spatial_crop: list[list[int]] = field(default_factory=list)  # [num_width_tiles, num_height_tiles]
    best_sizes: list[tuple[int, int]] = field(default_factory=list)
    image_spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of each image's tokens

    def add(self, ids: list[int], supervised: bool, ignore_id: int, is_image: bool = False) -> None:
        self.input_ids += ids
        self.labels += ids if supervised else [ignore_id] * len(ids)
        self.images_seq_mask += [is_image] * len(ids)


def _check_messages(messages: Any) -> list[dict]:
    """Structural checks shared by training and generation; raises SampleError."""
    if not isinstance(messages, list) or not messages:
        raise SampleError("bad_schema", "'messages' must be a non-empty list")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise SampleError("bad_schema", f"message {i} must be an object with 'role' and 'content'")
        role, content = msg["role"], msg["content"]
        if not isinstance(content, str):
            raise SampleError("bad_schema", f"message {i}: 'content' must be a string")
        try:
            content.encode("utf-8")
        except UnicodeEncodeError as e:
            raise SampleError("bad_schema", f"message {i}: content is not valid unicode") from e
        if not isinstance(role, str) or role not in USER_ROLES + ASSISTANT_ROLES + SYSTEM_ROLES:
            raise SampleError("unknown_role", f"message {i}: unknown role {role!r}")
        if role in SYSTEM_ROLES and i != 0:
            raise SampleError("system_not_first", f"message {i}: a system message is only allowed first")
        if role not in USER_ROLES and IMAGE_TOKEN in content:
            msg = f"message {i}: {IMAGE_TOKEN} is only allowed in user turns"
            raise SampleError("image_in_wrong_turn", msg)
    return messages


class DeepseekVL2Processor:
    """Tokenizer + image tiling + chat template for DeepSeek-VL2 (official `deepseek` format)."""

    def __init__(
        self,
        tokenizer,
        candidate_resolutions: list[list[int]],
        patch_size: int,
        downsample_ratio: int,
        image_mean=(0.5, 0.5, 0.5),
        image_std=(0.5, 0.5, 0.5),
        normalize: bool = True,
        image_token: str = IMAGE_TOKEN,
        pad_token: str = PAD_TOKEN,
        add_special_token: bool = False,
        sft_format: str = "deepseek",
        mask_prompt: bool = True,
        ignore_id: int = -100,
        **_unused: Any,
    ):
        self.candidate_resolutions = [list(r) for r in candidate_resolutions]
        self.image_size = self.candidate_resolutions[0][0]  # tile size, as in the official processor
        self.patch_size = patch_size
        self.downsample_ratio = downsample_ratio
        self.image_mean = tuple(image_mean)
        self.image_std = tuple(image_std)
        self.normalize = normalize
        self.image_token = image_token
        self.pad_token = pad_token
        self.add_special_token = add_special_token
        self.sft_format = sft_format
        self.mask_prompt = mask_prompt  # kept for reference only; see write_processor_config
        self.ignore_id = ignore_id
        self.tokenizer = tokenizer
        self._add_special_tokens()
        # A hash of the files it was loaded from (from_pretrained), naming it in the data validation cache; None:
        # built in code, so datasets validate without the per-source cache.
        self.fingerprint: str | None = None

    def _add_special_tokens(self) -> None:
        """Same additions, in the same order, as the official __init__ (released tokenizers have them all)."""
        tok = self.tokenizer
        tok.padding_side = "left"  # the official processor forces this; our Collator pads on its own anyway
        if tok.pad_token is None:
            tok.add_special_tokens({"pad_token": self.pad_token})
        if self.image_token not in tok.get_vocab():
            tok.add_special_tokens({"additional_special_tokens": [self.image_token]})
        tok.add_special_tokens({"additional_special_tokens": list(GROUNDING_TOKENS)})
        tok.add_special_tokens({"additional_special_tokens": list(CHAT_TOKENS)})
        self.image_token_id = tok.convert_tokens_to_ids(self.image_token)

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | Path) -> DeepseekVL2Processor:
        """Load processor_config.json and the tokenizer from a checkpoint directory."""
        root = Path(checkpoint_dir)
        path = root / PROCESSOR_CONFIG_NAME
        if not path.is_file():
            raise ProcessorConfigError(f"{path}: file not found")
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ProcessorConfigError(f"{path}: not valid JSON ({e})") from e
        config = _validate_config(config, path)
        tokenizer = _load_tokenizer(root)
        processor = cls(tokenizer, **config)
        processor.fingerprint = files_fingerprint(root)
        return processor

    # -- ids ---------------------------------------------------------------------------------------------

    @property
    def bos_id(self) -> int:
        return self.tokenizer.bos_token_id

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def tokenize(self, text: str) -> list[int]:
        """Plain text -> ids, never adding bos/eos (the official `encode(text, bos=False, eos=False)`)."""
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    # -- images ------------------------------------------------------------------------------------------

    def num_image_tokens(self, num_width_tiles: int, num_height_tiles: int) -> int:
        return image_token_count(
            self.image_size, self.patch_size, self.downsample_ratio, num_width_tiles, num_height_tiles
        )

    def best_resolution(self, image_size: tuple[int, int], cropping: bool) -> tuple[int, int]:
        if not cropping:
            return self.image_size, self.image_size
        return select_best_resolution(image_size, self.candidate_resolutions)

    def _pad_colour(self) -> tuple[int, ...]:
        return tuple(int(x * 255) for x in self.image_mean)

    def _to_tensor(self, image: Image.Image) -> torch.Tensor:
        return image_to_tensor(image, self.image_mean, self.image_std, self.normalize)

    def image_tiles(self, image: Image.Image, best_size: tuple[int, int]) -> list[torch.Tensor]:
        """[global view, local tiles row-major] as [3, tile, tile] tensors."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        tile, colour = self.image_size, self._pad_colour()
        global_view = ImageOps.pad(image, (tile, tile), color=colour)
        tiles = [self._to_tensor(global_view)]
        best_w, best_h = best_size
        local = global_view if best_size == (tile, tile) else ImageOps.pad(image, best_size, color=colour)
        for top in range(0, best_h, tile):
            for left in range(0, best_w, tile):
                tiles.append(self._to_tensor(local.crop((left, top, left + tile, top + tile))))
        return tiles

    # -- template ----------------------------------------------------------------------------------------

    @staticmethod
    def _prompt_messages(messages: list[dict], generation: bool) -> list[dict]:
        """For generation, drop a trailing assistant answer so the ids end at the last '<|Assistant|>:'."""
        if generation and messages and messages[-1]["role"] in ASSISTANT_ROLES:
            messages = messages[:-1]
        return messages

    @staticmethod
    def user_text(content: str) -> str:
        """The official `deepseek` template for one user turn followed by an empty assistant message."""
        content = content.strip()
        head = f"{CHAT_TOKENS[0]}: {content}\n\n" if content else f"{CHAT_TOKENS[0]}:"
        return head + f"{CHAT_TOKENS[1]}:"

    def render(self, messages: list[dict], generation: bool = False) -> str:
        """The text the encoded ids spell out, with one `<image>` per image (for logs and tests)."""
        messages = self._prompt_messages(_check_messages(messages), generation)
        parts = [self.tokenizer.bos_token]
        for msg in messages:
            if msg["role"] in USER_ROLES:
                parts.append(self.user_text(msg["content"]))
            elif msg["role"] in ASSISTANT_ROLES:
                parts.append(msg["content"].strip() + self.tokenizer.eos_token)
            else:
                parts.append(msg["content"].strip())
        return "".join(parts)

    def plan(
        self,
        messages: list[dict],
        image_sizes: list[tuple[int, int]],
        generation: bool = False,
        mask_prompt: bool = True,
    ) -> _Plan:
        """Token layout for a conversation given only the (width, height) of its images."""
        messages = _check_messages(messages)
        n_placeholders = sum(m["content"].count(IMAGE_TOKEN) for m in messages if m["role"] in USER_ROLES)
        if n_placeholders != len(image_sizes):
            raise SampleError(
                "image_count_mismatch",
                f"{n_placeholders} {IMAGE_TOKEN} placeholder(s) but {len(image_sizes)} image(s)",
            )
        if not generation and not any(m["role"] in ASSISTANT_ROLES for m in messages):
            raise SampleError("no_assistant_turn", "no assistant turn to train on")
        messages = self._prompt_messages(messages, generation)
        if generation and (not messages or messages[-1]["role"] not in USER_ROLES):
            raise SampleError("no_user_turn", "a generation prompt must end with a user turn")

        cropping = len(image_sizes) <= 2  # decided over the whole conversation, as in the official code
        plan, sizes = _Plan(), iter(image_sizes)
        plan.add([self.bos_id], supervised=False, ignore_id=self.ignore_id)
        for msg in messages:
            if msg["role"] in USER_ROLES:
                pieces = self.user_text(msg["content"]).split(IMAGE_TOKEN)
                for k, piece in enumerate(pieces):
                    if k > 0:
                        self._plan_image(plan, next(sizes), cropping)
                    plan.add(self.tokenize(piece), supervised=not mask_prompt, ignore_id=self.ignore_id)
            elif msg["role"] in ASSISTANT_ROLES:
                answer = self.tokenize(msg["content"].strip()) + [self.eos_id]
                plan.add(answer, supervised=True, ignore_id=self.ignore_id)
            else:
                system = self.tokenize(msg["content"].strip())
                plan.add(system, supervised=not mask_prompt, ignore_id=self.ignore_id)
        return plan

    def _plan_image(self, plan: _Plan, size: tuple[int, int], cropping: bool) -> None:
        best_w, best_h = self.best_resolution(size, cropping)
        tw, th = best_w // self.image_size, best_h // self.image_size
        start = len(plan.input_ids)
        plan.add([self.image_token_id] * self.num_image_tokens(tw, th), False, self.ignore_id, is_image=True)
        plan.image_spans.append((start, len(plan.input_ids)))
        plan.spatial_crop.append([tw, th])
        plan.best_sizes.append((best_w, best_h))

    def fit_length(self, plan: _Plan, max_length: int | None, overlong: str, generation: bool) -> _Plan:
        """Apply the overlong policy. 'error' and 'skip' both raise SampleError('overlong'): skipping is the
        dataset's job. 'truncate' cuts the tail of a training sample, but only after the last image's tokens
        and only if some supervised token survives; otherwise it raises 'overlong_cuts_image' or
        'overlong_no_labels'. A generation prompt is never truncated (its end is the '<|Assistant|>:' cue)."""
        if overlong not in OVERLONG_POLICIES:
            raise ValueError(f"overlong must be one of {OVERLONG_POLICIES}, got {overlong!r}")
        n = len(plan.input_ids)
        if max_length is None or n <= max_length:
            return plan
        if overlong != "truncate" or generation:
            raise SampleError("overlong", f"{n} tokens exceed max_length {max_length}")
        why = f"{n} tokens exceed max_length {max_length}"
        if plan.image_spans and plan.image_spans[-1][1] > max_length:
            raise SampleError("overlong_cuts_image", f"{why} and truncation would cut an image")
        if all(label == self.ignore_id for label in plan.labels[:max_length]):
            raise SampleError("overlong_no_labels", f"{why}; truncation leaves no answer tokens")
        plan.input_ids = plan.input_ids[:max_length]
        plan.labels = plan.labels[:max_length]
        plan.images_seq_mask = plan.images_seq_mask[:max_length]
        return plan

    def check(
        self,
        messages: list[dict],
        image_sizes: list[tuple[int, int]],
        generation: bool = False,
        max_length: int | None = None,
        overlong: str = "error",
    ) -> int:
        """Validate a sample without touching pixels; return its final length or raise SampleError."""
        plan = self.fit_length(self.plan(messages, image_sizes, generation), max_length, overlong, generation)
        return len(plan.input_ids)

    def encode(
        self,
        messages: list[dict],
        images: list[Image.Image] | None = None,
        generation: bool = False,
        max_length: int | None = None,
        overlong: str = "error",
        mask_prompt: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Encode one conversation.

        Returns input_ids [T], labels [T], images [n_tiles, 3, tile, tile] float32, images_seq_mask bool [T]
        and images_spatial_crop [n_images, 2] (= [num_width_tiles, num_height_tiles]). Without images,
        `images` is zeros(1, 3, tile, tile) and `images_spatial_crop` zeros(1, 2), as officially.
        """
        images = list(images or [])
        plan = self.plan(messages, [im.size for im in images], generation, mask_prompt)
        plan = self.fit_length(plan, max_length, overlong, generation)
        tiles = [t for im, best in zip(images, plan.best_sizes) for t in self.image_tiles(im, best)]
        if tiles:
            pixel = torch.stack(tiles)
            crop = torch.tensor(plan.spatial_crop, dtype=torch.long)
        else:
            pixel = torch.zeros(1, 3, self.image_size, self.image_size)
            crop = torch.zeros(1, 2, dtype=torch.long)
        return {
            "input_ids": torch.tensor(plan.input_ids, dtype=torch.long),
            "labels": torch.tensor(plan.labels, dtype=torch.long),
            "images": pixel,
            "images_seq_mask": torch.tensor(plan.images_seq_mask, dtype=torch.bool),
            "images_spatial_crop": crop,
        }

    def decode(self, ids, images_spatial_crop=None, skip_special_tokens: bool = False) -> str:
        """Decode ids, writing each image's run of image tokens as a single `<image>`.

        With `images_spatial_crop` the runs are split by each image's exact token count (so two adjacent
        images stay two placeholders); without it, every maximal run of image tokens counts as one image.
        """
        ids = [int(i) for i in ids]
        counts = None
        if images_spatial_crop is not None:
            counts = [self.num_image_tokens(int(tw), int(th)) for tw, th in images_spatial_crop if tw and th]
        out, text, i, k = [], [], 0, 0
        while i < len(ids):
            if ids[i] != self.image_token_id:
                text.append(ids[i])
                i += 1
                continue
            out.append(self.tokenizer.decode(text, skip_special_tokens=skip_special_tokens))
            text = []
            if counts is not None and k < len(counts):
                i += counts[k]
            else:
                while i < len(ids) and ids[i] == self.image_token_id:
                    i += 1
            k += 1
            out.append(self.image_token)
        out.append(self.tokenizer.decode(text, skip_special_tokens=skip_special_tokens))
        return "".join(out)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")  # fmt: skip


def files_fingerprint(root: Path) -> str:
    """sha256 of processor_config.json and the tokenizer files in `root` (what a processor is loaded from)."""
    h = hashlib.sha256()
    for name in (PROCESSOR_CONFIG_NAME, *TOKENIZER_FILES):
        path = root / name
        if path.is_file():
            h.update(name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def _load_tokenizer(root: Path):
    """AutoTokenizer from the checkpoint directory, with an error that names what is missing."""
    if not (root / "tokenizer.json").is_file() and not (root / "tokenizer.model").is_file():
        raise ProcessorConfigError(f"{root}: no tokenizer found (expected tokenizer.json or tokenizer.model)")
    from transformers import AutoTokenizer  # heavy import, only needed here
    from transformers.utils import logging as hf_logging

    # transformers warns that config.json's model_type is not a transformers model, and (v5) that a byte-level
    # tokenizer.json declared as LlamaTokenizerFast loads as its generic fast backend. Both are expected for
    # DeepSeek-VL2 checkpoints (the released ones too) and the tokenizer encodes exactly as tokenizer.json says.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(str(root))
    except Exception as e:  # transformers raises many types for broken files; report them all the same way
        raise ProcessorConfigError(f"{root}: could not load the tokenizer ({type(e).__name__}: {e})") from e
    finally:
        hf_logging.set_verbosity(verbosity)


# ----------------------------------------------------------------------------------------------------------
# Batching


class Collator:
    """Pads encoded samples into a batch.

    Right padding is for training, left padding for generation. `position_ids` count 0..len-1 over each
    sample's real tokens and are 0 on padding, so left-padded prompts still start at position 0 (the LM's
    default arange would not). `attention_mask` is long 1/0. Tiles are zero-padded to the batch maximum and
    `images_spatial_crop` with [0, 0] rows, as in the official `batchify`. Non-tensor fields (e.g. a reference
    answer string) are gathered into lists.

    With `pack_length`, the samples are first packed into rows of at most that many tokens
    (`deepseek_vl2_lora.data.packing`): the batch then has one row per pack and a `segment_ids` field.
    """

    def __init__(
        self,
        pad_id: int,
        padding_side: str = "right",
        ignore_id: int = -100,
        tile_keys: bool = False,
        pack_length: int | None = None,
    ):
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        if pack_length is not None and padding_side != "right":
            raise ValueError("packing is for training batches: use padding_side='right'")
        self.pad_id = pad_id
        self.padding_side = padding_side
        self.ignore_id = ignore_id
        self.tile_keys = tile_keys  # add `tile_keys` (content hashes per tile) for the vision feature cache
        self.pack_length = pack_length

    def _pad_1d(self, seqs: list[torch.Tensor], value, length: int) -> torch.Tensor:
        out = torch.full((len(seqs), length), value, dtype=seqs[0].dtype)
        for b, seq in enumerate(seqs):
            if self.padding_side == "right":
                out[b, : len(seq)] = seq
            else:
                out[b, length - len(seq) :] = seq
        return out

    @staticmethod
    def _pad_first_dim(tensors: list[torch.Tensor]) -> torch.Tensor:
        n = max(t.shape[0] for t in tensors)
        out = tensors[0].new_zeros((len(tensors), n, *tensors[0].shape[1:]))
        for b, t in enumerate(tensors):
            out[b, : t.shape[0]] = t
        return out

    def __call__(self, samples: list[dict]) -> dict:
        if not samples:
            raise ValueError("cannot collate an empty batch")
        if self.pack_length is not None:
            from .packing import pack_samples

            samples = pack_samples(samples, self.pack_length, self.ignore_id)
        length = max(len(s["input_ids"]) for s in samples)
        lengths = [len(s["input_ids"]) for s in samples]
        positions = [s.get("position_ids", torch.arange(n, dtype=torch.long)) for s, n in zip(samples, lengths)]
        batch = {
            "input_ids": self._pad_1d([s["input_ids"] for s in samples], self.pad_id, length),
            "attention_mask": self._pad_1d([torch.ones(n, dtype=torch.long) for n in lengths], 0, length),
            "labels": self._pad_1d([s["labels"] for s in samples], self.ignore_id, length),
            "position_ids": self._pad_1d(positions, 0, length),
            "images_seq_mask": self._pad_1d([s["images_seq_mask"] for s in samples], False, length),
            "images": self._pad_first_dim([s["images"] for s in samples]),
            "images_spatial_crop": self._pad_first_dim([s["images_spatial_crop"] for s in samples]),
        }
        if "segment_ids" in samples[0]:
            batch["segment_ids"] = self._pad_1d([s["segment_ids"] for s in samples], 0, length)
        for key in samples[0]:
            if key not in batch and not isinstance(samples[0][key], torch.Tensor):
                batch[key] = [s.get(key) for s in samples]
        if self.tile_keys:
            from ..training.feature_cache import tile_key

            batch["tile_keys"] = [[tile_key(t) for t in s["images"]] for s in samples]
        return batch
