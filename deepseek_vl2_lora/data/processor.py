"""DeepSeek-VL2 processor: the `deepseek` chat template and SFT labels, with images tiled by tiling.py and batched by
collate.py.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..model.processor_config import (
    PROCESSOR_CONFIG_NAME,
    ProcessorConfigError,
    check_processor_config,
    image_token_count,
)
from ..model.tokenizer import CHAT_TOKENS, GROUNDING_TOKENS, IMAGE_TOKEN, PAD_TOKEN
from .tiling import select_best_resolution, tile_image

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


def one_line(error: BaseException) -> str:
    """An exception's message on one line (library errors often span several), for one-line user errors."""
    return " ".join(str(error).split())


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
        config = check_processor_config(config, path)
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

    def image_tiles(self, image: Image.Image, best_size: tuple[int, int]) -> list[torch.Tensor]:
        """[global view, local tiles row-major] as [3, tile, tile] tensors."""
        return tile_image(image, best_size, self.image_size, self.image_mean, self.image_std, self.normalize)

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
