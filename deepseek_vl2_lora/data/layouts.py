"""Record layouts of SFT data files, detected per file and turned into (messages, images, meta).

A file's layout is detected from the keys of its first record that has one (after `columns` renames keys):

==============  =========================================================================================
layout          record
==============  =========================================================================================
messages        ``{"messages": [{"role", "content": str}], "images": [...]}`` (the native layout)
openai          ``messages`` whose ``content`` is a list of parts: ``{"type": "text", "text"}``,
                ``{"type": "image"}`` (the next entry of ``images``), ``{"type": "image", "image": path}`` or
                ``{"type": "image_url", "image_url": {"url": path}}``; an image part becomes ``<image>\\n``
                at its position
llava           ``{"image": path | [paths], "conversations": [{"from": "human"|"gpt", "value"}]}``
sharegpt        ``{"images": [paths], "conversations": [{"from": "user"|"assistant", "value"}]}`` (LLaVA and
                ShareGPT records may carry the system prompt as a top-level ``"system"``)
the_cauldron    ``{"images": [paths], "texts": [{"user", "assistant"}, ...]}`` (a user and an assistant turn
                per pair)
swift           ms-swift's ``{"system"?, "history"?: [[query, response], ...], "query", "response",
                "images"?}``
==============  =========================================================================================

A record of another layout than its file's is a bad sample (``bad_schema``) naming the layout expected
(``llava`` and ``sharegpt`` records mix freely, as do ``messages`` and ``openai`` ones).

Placeholders: in every layout but ``messages`` (whose placeholders must match its images exactly), a record with
more images than ``<image>`` placeholders gets the missing ones put at the start of its first user turn, one
``<image>\\n`` each (ms-swift's rule; LLaVA's for records without any), counted as ``placeholders_added``. More
placeholders than images is an error (``image_count_mismatch``). Image URLs are an error (``image_url``): images are
never fetched at run time.

Images: wherever a layout takes an image path it also takes an embedded image, a ``{"bytes", "path"}`` struct as
Parquet files, Arrow tables and `datasets` Image columns hold them (the bytes win; a struct without bytes is read
from its path).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .processor import IMAGE_TOKEN, SampleError

LLAVA_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
URL_SCHEMES = ("http://", "https://", "s3://", "gs://")
# layout -> the layout family it mixes with (records are checked against the family of the file's layout)
FAMILY = {
    "messages": "messages",
    "openai": "messages",
    "llava": "conversations",
    "sharegpt": "conversations",
    "the_cauldron": "texts",
    "swift": "query/response",
}


@dataclass
class Parsed:
    messages: list[dict]
    images: list  # path strings (relative to the data file or data.image_root) or {bytes, path} structs
    meta: dict
    placeholders_added: int = 0


# ----------------------------------------------------------------------------------------------------------
# Detection


def rename_columns(record: Any, columns: dict[str, str] | None) -> Any:
    """`columns` maps our key to the file's (``{"messages": "conv"}``): the file's keys are renamed to ours."""
    if not columns or not isinstance(record, dict):
        return record
    record = dict(record)
    for ours, theirs in columns.items():
        if theirs in record and ours != theirs:
            record[ours] = record.pop(theirs)
    return record


def _has_list_content(messages: Any) -> bool:
    return isinstance(messages, list) and any(
        isinstance(m, dict) and isinstance(m.get("content"), list) for m in messages
    )


def detect_layout(record: Any) -> str | None:
    """The layout a record's keys say, or None when they say none."""
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        messages = record["messages"]
        return "openai" if _has_list_content(messages) else "messages"
    if "conversations" in record:
        if "images" in record:
            return "sharegpt"
        if "image" in record:
            return "llava"
        turns = record["conversations"]
        froms = {t.get("from") for t in turns if isinstance(t, dict)} if isinstance(turns, list) else set()
        return "sharegpt" if froms & {"user", "assistant"} else "llava"
    if "texts" in record:
        return "the_cauldron"
    if "query" in record and "response" in record:
        return "swift"
    return None


def parse(record: Any, layout: str | None = None) -> Parsed:
    """A record -> Parsed, in the file's `layout` (None: the record's own); raises SampleError."""
    if not isinstance(record, dict):
        raise SampleError("bad_schema", "a record must be a JSON object")
    own = detect_layout(record)
    if own is None:
        expected = f"layout {layout}" if layout else "a known layout"
        raise SampleError(
            "bad_schema",
            f"a record needs the keys of {expected} ('messages', 'conversations', 'texts' or 'query'/'response'; "
            "data.columns= maps other names)",
        )
    if layout is not None and FAMILY[own] != FAMILY[layout]:
        raise SampleError("bad_schema", f"record has layout {own}, but this file's layout is {layout}")
    parsed = _CONVERTERS[FAMILY[own]](record)
    check_urls(parsed.images)
    if own != "messages":
        parsed.placeholders_added = add_missing_placeholders(parsed.messages, len(parsed.images))
    return parsed


# ----------------------------------------------------------------------------------------------------------
# Shared rules


def _is_image(value: Any) -> bool:
    """A path string, or an embedded image: a ``{"bytes", "path"}`` struct (Parquet / Arrow / `datasets`) with
    bytes or a path."""
    if isinstance(value, str):
        return bool(value)
    if isinstance(value, dict) and set(value) <= {"bytes", "path"}:
        data, path = value.get("bytes"), value.get("path")
        return (isinstance(data, bytes) and bool(data)) or (data is None and isinstance(path, str) and bool(path))
    return False


def image_list(value: Any, what: str) -> list:
    """A record's images: path strings or ``{"bytes", "path"}`` structs (one, or a list)."""
    if value is None:
        return []
    if not isinstance(value, list):
        value = [value]
    if not all(_is_image(v) for v in value):
        raise SampleError(
            "bad_schema", f"{what} must be a list of non-empty path strings or {{'bytes', 'path'}} image structs"
        )
    return value


def image_path(image: str | dict) -> str | None:
    """The path an image is read from: a path string, or a struct's path when it has no bytes."""
    if isinstance(image, str):
        return image
    return image["path"] if image.get("bytes") is None else None


def check_urls(images: list) -> None:
    for image in images:
        path = image_path(image)
        if path is not None and path.lower().startswith(URL_SCHEMES):
            raise SampleError(
                "image_url",
                f"image {path!r} is a URL: images are not fetched at run time. Download them first (e.g. "
                "`wget -x -nH -P images URL`, or a small script) and give local paths relative to the data file "
                "(or to data.image_root)",
            )


def _user_turns(messages: list[dict]) -> list[dict]:
    return [
        m for m in messages if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str)
    ]


def add_missing_placeholders(messages: list[dict], num_images: int) -> int:
    """Put the `<image>\\n` placeholders missing for `num_images` at the start of the first user turn (in place);
    the number added. More placeholders than images is an error; without a user turn nothing is added (the
    processor reports the mismatch)."""
    users = _user_turns(messages)
    present = sum(m["content"].count(IMAGE_TOKEN) for m in users)
    if present > num_images:
        raise SampleError(
            "image_count_mismatch", f"{present} {IMAGE_TOKEN} placeholder(s) but only {num_images} image(s)"
        )
    missing = num_images - present
    if missing and users:
        users[0]["content"] = f"{IMAGE_TOKEN}\n" * missing + users[0]["content"]
        return missing
    return 0


def _meta(record: dict, used: tuple[str, ...]) -> dict:
    return {k: v for k, v in record.items() if k not in used}


# ----------------------------------------------------------------------------------------------------------
# One converter per layout family


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise SampleError("bad_schema", f"{what} must be a string")
    return value


def _image_part_path(part: dict) -> str | dict | None:
    if part.get("type") == "image_url":
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        if not isinstance(url, str) or not url:
            raise SampleError("bad_schema", "an image_url part needs image_url.url")
        return url
    image = part.get("image")
    if image is not None and not _is_image(image):
        raise SampleError("bad_schema", "an image part's 'image' must be a path string or a {'bytes', 'path'} struct")
    return image


def _openai_content(parts: list, where: str, paths: list[str]) -> tuple[str, int]:
    """List content -> (text with `<image>\\n` per image part, number of image parts without a path)."""
    text, bare = [], 0
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            text.append(_text(part.get("text"), f"{where}: a text part's 'text'"))
        elif kind in ("image", "image_url"):
            path = _image_part_path(part)
            if path is None:
                bare += 1
            else:
                paths.append(path)
            text.append(f"{IMAGE_TOKEN}\n")
        else:
            raise SampleError("bad_schema", f"{where}: content parts must be {{'type': 'text'|'image'|'image_url'}}")
    return "".join(text), bare


def convert_messages(record: dict) -> Parsed:
    """`messages` with string content (native) or OpenAI-style list content."""
    messages, images = record["messages"], image_list(record.get("images"), "'images'")
    if _has_list_content(messages):
        part_paths, bare = [], 0
        converted = []
        for i, m in enumerate(messages):
            if isinstance(m, dict) and isinstance(m.get("content"), list):
                content, n = _openai_content(m["content"], f"message {i}", part_paths)
                bare += n
                m = {**m, "content": content}
            converted.append(m)
        if part_paths and (bare or images):
            raise SampleError("bad_schema", "give images either as paths in the image parts or in 'images', not both")
        messages, images = converted, part_paths or images
    return Parsed(messages, images, _meta(record, ("messages", "images")))


def convert_conversations(record: dict) -> Parsed:
    """LLaVA (`image`, `from: human/gpt`) or ShareGPT (`images`, `from: user/assistant`)."""
    if "image" in record and "images" in record:
        raise SampleError("bad_schema", "a record has both 'image' (LLaVA) and 'images' (ShareGPT)")
    key = "images" if "images" in record else "image"
    images = image_list(record.get(key), f"'{key}'")
    turns = record["conversations"]
    if not isinstance(turns, list):
        raise SampleError("bad_schema", "'conversations' must be a list")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            msg = f"conversation turn {i} must be an object with 'from' and 'value'"
            raise SampleError("bad_schema", msg)
        role = turn["from"]
        if not isinstance(role, str) or role not in LLAVA_ROLES:
            raise SampleError("unknown_role", f"conversation turn {i}: unknown 'from' value {role!r}")
        messages.append({"role": LLAVA_ROLES[role], "content": turn["value"]})
    if record.get("system") is not None:  # LLaMA-Factory's ShareGPT keeps the system prompt at the top level
        messages.insert(0, {"role": "system", "content": _text(record["system"], "'system'")})
    return Parsed(messages, images, _meta(record, ("conversations", key, "system")))


def convert_cauldron(record: dict) -> Parsed:
    """the_cauldron: `texts` = [{user, assistant}, ...], `images` at the top level."""
    texts = record["texts"]
    if not isinstance(texts, list) or not texts:
        raise SampleError("bad_schema", "'texts' must be a non-empty list of {'user', 'assistant'} objects")
    messages = []
    for i, pair in enumerate(texts):
        if not isinstance(pair, dict) or "user" not in pair or "assistant" not in pair:
            raise SampleError("bad_schema", f"texts[{i}] must be an object with 'user' and 'assistant'")
        messages.append({"role": "user", "content": _text(pair["user"], f"texts[{i}].user")})
        messages.append({"role": "assistant", "content": _text(pair["assistant"], f"texts[{i}].assistant")})
    return Parsed(messages, image_list(record.get("images"), "'images'"), _meta(record, ("texts", "images")))


def convert_swift(record: dict) -> Parsed:
    """ms-swift: optional `system`, `history` = [[query, response], ...], then `query` / `response`."""
    messages = []
    if record.get("system") is not None:
        messages.append({"role": "system", "content": _text(record["system"], "'system'")})
    history = record.get("history") or []
    if not isinstance(history, list):
        raise SampleError("bad_schema", "'history' must be a list of [query, response] pairs")
    for i, pair in enumerate(history):
        if not isinstance(pair, list) or len(pair) != 2:
            raise SampleError("bad_schema", f"history[{i}] must be a [query, response] pair")
        messages.append({"role": "user", "content": _text(pair[0], f"history[{i}][0]")})
        messages.append({"role": "assistant", "content": _text(pair[1], f"history[{i}][1]")})
    messages.append({"role": "user", "content": _text(record["query"], "'query'")})
    messages.append({"role": "assistant", "content": _text(record["response"], "'response'")})
    images = image_list(record.get("images"), "'images'")
    return Parsed(messages, images, _meta(record, ("system", "history", "query", "response", "images")))


_CONVERTERS = {
    "messages": convert_messages,
    "conversations": convert_conversations,
    "texts": convert_cauldron,
    "query/response": convert_swift,
}
