"""Record layouts (deepseek_vl2_lora.data.layouts): each gives the same encoding as the equivalent `messages` record."""

import json
from pathlib import Path

import pytest
import torch
from test_data import png, write_jsonl

from deepseek_vl2_lora.data import SFTDataset
from deepseek_vl2_lora.data.layouts import detect_layout, parse
from deepseek_vl2_lora.data.processor import SampleError
from deepseek_vl2_lora.training.config import ConfigError, check_config

SYSTEM = "You answer briefly."
Q1, A1, Q2, A2 = "What colour is the shape?", "red", "And its shape?", "circle"


def native(first_q=f"<image>\n{Q1}", system=True, images=("a.png",)) -> dict:
    messages = [{"role": "system", "content": SYSTEM}] if system else []
    messages += [
        {"role": "user", "content": first_q},
        {"role": "assistant", "content": A1},
        {"role": "user", "content": Q2},
        {"role": "assistant", "content": A2},
    ]
    return {"messages": messages, "images": list(images)}


# The same two-turn conversation about a.png in every layout; the_cauldron has no system turn.
LAYOUTS = {
    "llava": (
        {"image": "a.png", "conversations": [
            {"from": "system", "value": SYSTEM}, {"from": "human", "value": Q1}, {"from": "gpt", "value": A1},
            {"from": "human", "value": Q2}, {"from": "gpt", "value": A2}]},
        native(),
        1,
    ),
    "sharegpt": (  # placeholders given, with the ShareGPT `images` key
        {"images": ["a.png"], "conversations": [
            {"from": "system", "value": SYSTEM}, {"from": "user", "value": f"<image>\n{Q1}"},
            {"from": "assistant", "value": A1}, {"from": "user", "value": Q2}, {"from": "assistant", "value": A2}]},
        native(),
        0,
    ),
    "sharegpt_system": (  # LLaMA-Factory's ShareGPT: system prompt at the top level, from human/gpt
        {"system": SYSTEM, "images": ["a.png"], "conversations": [
            {"from": "human", "value": f"<image>\n{Q1}"}, {"from": "gpt", "value": A1},
            {"from": "human", "value": Q2}, {"from": "gpt", "value": A2}]},
        native(),
        0,
    ),
    "the_cauldron": (
        {"images": ["a.png"], "texts": [{"user": Q1, "assistant": A1, "source": "x"}, {"user": Q2, "assistant": A2}]},
        native(system=False),
        1,
    ),
    "swift": (
        {"system": SYSTEM, "history": [[Q1, A1]], "query": Q2, "response": A2, "images": ["a.png"]},
        native(),
        1,
    ),
    "openai": (
        {"messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": Q1}]},
            {"role": "assistant", "content": [{"type": "text", "text": A1}]},
            {"role": "user", "content": Q2}, {"role": "assistant", "content": A2}], "images": ["a.png"]},
        native(),
        0,
    ),
    "openai_paths": (
        {"messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": Q1}]},
            {"role": "assistant", "content": A1}, {"role": "user", "content": Q2},
            {"role": "assistant", "content": A2}]},
        native(),
        0,
    ),
}  # fmt: skip
DETECTED = {"openai_paths": "openai", "sharegpt_system": "sharegpt"}  # variants: the layout detected


@pytest.fixture
def data_dir(tmp_path) -> Path:
    (tmp_path / "a.png").write_bytes(png((10, 200, 30)))
    (tmp_path / "b.png").write_bytes(png((10, 20, 230), size=(24, 16)))
    return tmp_path


def assert_same_encoding(a: dict, b: dict) -> None:
    for key in ("input_ids", "labels", "images_seq_mask"):
        assert torch.equal(a[key], b[key]), key
    assert torch.equal(a["images"], b["images"])


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_layout_encodes_like_messages(name, data_dir, proc):
    record, equivalent, added = LAYOUTS[name]
    ds = SFTDataset(write_jsonl(data_dir / f"{name}.jsonl", [record, record]), proc)
    ref = SFTDataset(write_jsonl(data_dir / "native.jsonl", [equivalent]), proc)
    assert ds.report.layout == DETECTED.get(name, name) and ref.report.layout == "messages"
    assert ds.report.placeholders_added == 2 * added and ds.report.kept == 2
    assert_same_encoding(ds[0], ref[0])
    assert ds.samples[0].messages == ref.samples[0].messages
    assert "2 records" in ds.report.summary() and "layout" in ds.report.summary()
    if name == "the_cauldron":
        assert ds.samples[0].meta == {}  # `texts` and `images` are consumed; `source` is inside texts


def test_sharegpt_without_placeholders_keeps_images(data_dir, proc):
    record = {"images": ["a.png", "b.png"], "conversations": [
        {"from": "user", "value": "Compare them."}, {"from": "assistant", "value": "different"}]}  # fmt: skip
    ds = SFTDataset(write_jsonl(data_dir / "sg.jsonl", [record]), proc)
    assert ds.report.layout == "sharegpt" and ds.report.placeholders_added == 2
    assert ds.samples[0].image_paths == [data_dir / "a.png", data_dir / "b.png"]
    turns = [
        {"role": "user", "content": "<image>\n<image>\nCompare them."},
        {"role": "assistant", "content": "different"},
    ]
    equivalent = {"messages": turns, "images": ["a.png", "b.png"]}
    ref = SFTDataset(write_jsonl(data_dir / "ref.jsonl", [equivalent]), proc)
    assert_same_encoding(ds[0], ref[0])
    assert ds[0]["images_spatial_crop"].shape[0] == 2  # both images reach the model
    assert ds.report.to_dict()["placeholders_added"] == 2


def test_partial_placeholders_are_completed_and_extra_ones_are_an_error(data_dir, proc):
    two = {"images": ["a.png", "b.png"], "conversations": [
        {"from": "user", "value": "Left <image> vs right?"}, {"from": "assistant", "value": "x"}]}  # fmt: skip
    parsed = parse(two)
    assert parsed.messages[0]["content"] == "<image>\nLeft <image> vs right?" and parsed.placeholders_added == 1
    too_many = {"images": ["a.png"], "conversations": [
        {"from": "user", "value": "<image> <image>"}, {"from": "assistant", "value": "x"}]}  # fmt: skip
    path = write_jsonl(data_dir / "many.jsonl", [two, too_many])
    with pytest.raises(SampleError, match=rf"{path}:2: 2 <image> placeholder\(s\) but only 1 image") as info:
        SFTDataset(path, proc)
    assert info.value.reason == "image_count_mismatch"


@pytest.mark.parametrize("url", ["http://x.org/a.png", "https://x.org/a.png", "s3://b/a.png", "gs://b/a.png"])
def test_image_urls_are_an_error(url, data_dir, proc):
    record = {"images": [url], "texts": [{"user": "q", "assistant": "a"}]}
    path = write_jsonl(data_dir / "url.jsonl", [record])
    with pytest.raises(SampleError, match=f"{path}:1: image '{url}' is a URL: images are not fetched") as info:
        SFTDataset(path, proc)
    assert info.value.reason == "image_url" and "Download them first" in str(info.value)
    openai = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]},
                           {"role": "assistant", "content": "a"}]}  # fmt: skip
    with pytest.raises(SampleError, match="is a URL"):
        parse(openai)


def test_record_of_another_layout_is_a_bad_sample(data_dir, proc):
    swift = {"query": "<image>\nq", "response": "a", "images": ["a.png"]}
    other = {"images": ["a.png"], "texts": [{"user": "q", "assistant": "a"}]}
    path = write_jsonl(data_dir / "mixed.jsonl", [swift, other, swift])
    with pytest.raises(SampleError, match=f"{path}:2: record has layout the_cauldron, but this file's layout is swift"):
        SFTDataset(path, proc)
    ds = SFTDataset(path, proc, on_bad_sample="skip")
    assert ds.report.layout == "swift" and ds.report.kept == 2 and dict(ds.report.skipped) == {"bad_schema": 1}


def test_columns_rename_keys(data_dir, proc):
    record = {"conv": native()["messages"], "pics": ["a.png"], "id": 7}
    ds = SFTDataset(
        write_jsonl(data_dir / "cols.jsonl", [record]), proc, columns={"messages": "conv", "images": "pics"}
    )
    ref = SFTDataset(write_jsonl(data_dir / "native.jsonl", [native()]), proc)
    assert ds.report.layout == "messages" and ds.samples[0].meta == {"id": 7}
    assert_same_encoding(ds[0], ref[0])
    with pytest.raises(SampleError, match="a record needs the keys of"):
        SFTDataset(data_dir / "cols.jsonl", proc)


def test_detect_layout():
    assert detect_layout({"conversations": [{"from": "human", "value": "x"}]}) == "llava"
    assert detect_layout({"conversations": [{"from": "user", "value": "x"}]}) == "sharegpt"
    assert detect_layout({"messages": "x"}) == "messages" and detect_layout([1]) is None
    assert detect_layout({"query": "q"}) is None
    # the native layout stays strict: a missing placeholder is an error, not an insertion
    assert parse(native(first_q=Q1)).placeholders_added == 0
    assert json.loads(json.dumps(parse(native()).meta)) == {}


def test_columns_compose_from_the_command_line():
    from test_train_config import compose_cfg

    cfg = compose_cfg("data.columns={messages:conv,images:pics}")
    assert dict(cfg.data.columns) == {"messages": "conv", "images": "pics"}
    check_config(cfg)
    with pytest.raises(ConfigError, match="data.columns=.*must be a mapping"):
        check_config(compose_cfg("data.columns=conv"))


def test_openai_image_parts():
    def user(*parts):
        return {"messages": [{"role": "user", "content": list(parts)}, {"role": "assistant", "content": "a"}]}

    text = {"type": "text", "text": "Which?"}
    parsed = parse(
        user({"type": "image_url", "image_url": {"url": "a.png"}}, text, {"type": "image", "image": "b.png"})
    )
    assert parsed.images == ["a.png", "b.png"] and parsed.messages[0]["content"] == "<image>\nWhich?<image>\n"
    assert parse(user({"type": "image_url", "image_url": "a.png"}, text)).images == ["a.png"]
    with pytest.raises(SampleError, match="not both"):
        parse({**user({"type": "image", "image": "a.png"}, text), "images": ["b.png"]})
    with pytest.raises(SampleError, match="content parts must be"):
        parse(user({"type": "audio"}))
    bare = {**user({"type": "image"}, text), "images": ["a.png", "b.png"]}  # one part for two images: one added
    assert parse(bare).messages[0]["content"] == "<image>\n<image>\nWhich?" and parse(bare).placeholders_added == 1
