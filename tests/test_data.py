"""Dataset loading: both formats, every bad-input kind (error with file:line, or counted skip), fuzzing, demo."""

import importlib.util
import io
import json
import re
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from deepseek_vl2_lora.data import DataReport, EvalDataset, SFTDataset, collate_eval, convert_llava, load_image
from deepseek_vl2_lora.data.collate import Collator
from deepseek_vl2_lora.data.processor import SampleError

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "data" / "demo"
N_IMG_TOKENS = 41  # tile 32, patch 4, downsample 2: 4*5 + 1 + 4*5


def png(colour=(200, 30, 30), size=(16, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def files(tmp_path_factory):
    """A directory with one image of each kind the loader must tell apart."""
    d = tmp_path_factory.mktemp("files")
    good = png()
    (d / "good.png").write_bytes(good)
    (d / "empty.png").write_bytes(b"")
    (d / "corrupt.png").write_bytes(b"this is not an image at all")
    (d / "truncated.png").write_bytes(png(size=(64, 64))[:60])
    (d / "subdir").mkdir()
    return d


def record(question="<image>\nWhat colour is the shape?", answer="red", images=("good.png",)):
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "images": list(images)}  # fmt: skip


def write_jsonl(path: Path, lines) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------ formats


def test_jsonl_good(files, proc):
    path = write_jsonl(files / "good.jsonl", [record(), "", record(answer="blue")])
    ds = SFTDataset(path, proc)
    assert len(ds) == 2 and ds.report.kept == 2 and ds.report.total == 2
    enc = ds[1]
    assert enc["images_seq_mask"].sum() == N_IMG_TOKENS
    answer = proc.tokenize("blue") + [proc.eos_id]
    assert enc["labels"][enc["labels"] != -100].tolist() == answer
    assert ds.samples[1].location == f"{path}:3"  # blank line 2 is not a record


def test_image_root_and_meta(files, proc, tmp_path):
    rec = dict(record(), qtype="colour")
    ds = SFTDataset(write_jsonl(tmp_path / "d.jsonl", [rec]), proc, image_root=files)
    assert ds.samples[0].image_paths == [files / "good.png"] and ds.samples[0].meta == {"qtype": "colour"}


def test_llava_conversion():
    rec = {"id": "x", "image": "a.png", "conversations": [
        {"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "A dog."},
        {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Brown."}]}  # fmt: skip
    messages, images = convert_llava(rec)
    assert images == ["a.png"]
    assert messages == [
        {"role": "user", "content": "<image>\nWhat is it?"},
        {"role": "assistant", "content": "A dog."},
        {"role": "user", "content": "Colour?"},
        {"role": "assistant", "content": "Brown."},
    ]
    rec2 = {"image": ["a.png", "b.png"], "conversations": [{"from": "human", "value": "Compare."}]}
    assert convert_llava(rec2)[0][0]["content"] == "<image>\n<image>\nCompare."
    rec3 = {"image": "a.png", "conversations": [{"from": "human", "value": "Look: <image> ok"}]}
    assert convert_llava(rec3)[0][0]["content"] == "Look: <image> ok"  # existing placeholder kept
    rec4 = {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "hi"}]}
    assert convert_llava(rec4) == ([{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}], [])


def test_llava_json_dataset(files, proc):
    data = [
        {
            "image": "good.png",
            "conversations": [{"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "red"}],
        },
        {"image": "missing.png", "conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]},
        {"conversations": [{"from": "robot", "value": "x"}, {"from": "gpt", "value": "y"}]},
    ]
    path = files / "llava.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(SampleError, match=re.escape(f"{path}[1]")) as info:
        SFTDataset(path, proc)
    assert info.value.reason == "missing_image"
    ds = SFTDataset(path, proc, on_bad_sample="skip")
    assert len(ds) == 1 and dict(ds.report.skipped) == {"missing_image": 1, "unknown_role": 1}
    assert proc.decode(ds[0]["input_ids"]).startswith("<｜begin▁of▁sentence｜><|User|>: <image>\nColour?")


def test_json_file_level_errors(files, proc):
    (files / "bad.json").write_text("[{", encoding="utf-8")
    with pytest.raises(SampleError, match="bad.json.*invalid JSON"):
        SFTDataset(files / "bad.json", proc, on_bad_sample="skip")  # a broken file cannot be skipped
    (files / "obj.json").write_text("{}", encoding="utf-8")
    with pytest.raises(SampleError, match="list of records"):
        SFTDataset(files / "obj.json", proc, on_bad_sample="skip")
    with pytest.raises(SampleError, match="not found"):
        SFTDataset(files / "nope.jsonl", proc)
    with pytest.raises(SampleError, match=r".jsonl, .json or .parquet"):
        SFTDataset(files / "good.png", proc)


def test_exif_transpose(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 128, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    img.save(tmp_path / "rot.png", exif=exif)
    official = Image.open(tmp_path / "rot.png").convert("RGB")  # DeepSeek-VL2's loader: no EXIF rotation
    loaded = load_image(tmp_path / "rot.png")
    assert loaded.size == official.size == (40, 20) and loaded.mode == "RGB"
    assert loaded.tobytes() == official.tobytes()
    rotated = load_image(tmp_path / "rot.png", exif_transpose=True)  # data.exif_transpose=true
    assert rotated.size == (20, 40) and rotated.mode == "RGB"
    Image.new("RGBA", (4, 4)).save(tmp_path / "rgba.png")
    assert load_image(tmp_path / "rgba.png").mode == "RGB"


# ------------------------------------------------------------------------------------------ bad samples

BAD_LINES = [  # (line content, reason)
    (record(images=["missing.png"]), "missing_image"),
    (record(images=["empty.png"]), "empty_image"),
    (record(images=["corrupt.png"]), "corrupt_image"),
    (record(images=["truncated.png"]), None),  # a sound header: validation reads no pixels (decode fails later)
    (record(images=["subdir"]), "missing_image"),
    ('{"messages": [', "malformed_json"),
    ("not json at all", "malformed_json"),
    ({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}, "unknown_role"),
    (record(question="<image> and <image>"), "image_count_mismatch"),
    (record(question="no placeholder"), "image_count_mismatch"),
    (record(images=[]), "image_count_mismatch"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no_assistant_turn"),
    (
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "system", "content": "s"},
                {"role": "assistant", "content": "y"},
            ]
        },
        "system_not_first",
    ),  # fmt: skip
    (record(answer="look <image>", images=["good.png", "good.png"]), "image_in_wrong_turn"),
    ([1, 2], "bad_schema"),
    ({"text": "no messages"}, "bad_schema"),
    ({"messages": "hello"}, "bad_schema"),
    ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]}, "bad_schema"),
    (dict(record(), images="good.png"), None),  # a single path string is accepted
    (dict(record(), images=[3]), "bad_schema"),
    (record(answer="word " * 400), "overlong"),
]


@pytest.mark.parametrize("line, reason", BAD_LINES)
def test_each_bad_kind_errors_with_location(files, proc, line, reason):
    path = write_jsonl(files / "one.jsonl", [record(), line])
    if reason is None:
        assert len(SFTDataset(path, proc, max_length=300)) == 2
        return
    with pytest.raises(SampleError) as info:
        SFTDataset(path, proc, max_length=300)
    assert info.value.reason == reason
    assert str(info.value).startswith(f"{path}:2: ")


def test_bad_kinds_skipped_and_counted(files, proc):
    lines = [record()] + [line for line, reason in BAD_LINES if reason] + [record(answer="blue")]
    path = write_jsonl(files / "many.jsonl", lines)
    ds = SFTDataset(path, proc, on_bad_sample="skip", max_length=300, overlong="skip")
    expected = {}
    for _, reason in BAD_LINES:
        if reason:
            expected[reason] = expected.get(reason, 0) + 1
    assert dict(ds.report.skipped) == expected
    assert len(ds) == ds.report.kept == 2 and ds.report.total == len(lines)
    report = ds.report.to_dict()
    assert report["kept"] == 2 and report["skipped"] == expected
    assert json.loads(json.dumps(report)) == report
    text = str(ds.report)
    assert f"{len(lines)} records, 2 kept, {len(lines) - 2} skipped" in text
    assert f"missing_image: {expected['missing_image']}" in text and f"{path}:2" in text
    for i in range(len(ds)):
        ds[i]


def test_invalid_utf8_line_is_one_bad_record(files, proc):
    path = files / "bytes.jsonl"
    path.write_bytes(json.dumps(record()).encode() + b"\n\xff\xfe{}\n" + json.dumps(record()).encode() + b"\n")
    ds = SFTDataset(path, proc, on_bad_sample="skip")
    assert len(ds) == 2 and dict(ds.report.skipped) == {"malformed_json": 1}


def test_overlong_policies(files, proc):
    long = record(answer="word " * 400)
    path = write_jsonl(files / "long.jsonl", [record(), long])
    # overlong=error wins over on_bad_sample=skip for over-long samples
    with pytest.raises(SampleError, match=re.escape(f"{path}:2")):
        SFTDataset(path, proc, on_bad_sample="skip", max_length=300, overlong="error")
    # overlong=skip counts it even when other bad samples would raise
    ds = SFTDataset(path, proc, on_bad_sample="error", max_length=300, overlong="skip")
    assert len(ds) == 1 and dict(ds.report.skipped) == {"overlong": 1}
    ds = SFTDataset(path, proc, max_length=300, overlong="truncate")
    assert len(ds) == 2 and len(ds[1]["input_ids"]) == 300 and (ds[1]["labels"] != -100).any()
    # truncation that would cut the image: on_bad_sample decides
    with pytest.raises(SampleError) as info:
        SFTDataset(path, proc, max_length=20, overlong="truncate")
    assert info.value.reason == "overlong_cuts_image"
    ds = SFTDataset(path, proc, on_bad_sample="skip", max_length=20, overlong="truncate")
    assert len(ds) == 0 and dict(ds.report.skipped) == {"overlong_cuts_image": 2}


def test_decompression_bomb_is_corrupt_image(tmp_path, monkeypatch):
    # PIL raises DecompressionBombError (not an OSError) for huge images; it must still become a SampleError.
    (tmp_path / "big.png").write_bytes(png(size=(16, 16)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # 256 px > 2 * 50: the error threshold
    with pytest.raises(SampleError) as info:
        load_image(tmp_path / "big.png")
    assert info.value.reason == "corrupt_image"


def test_image_vanishing_after_validation(tmp_path, proc):
    (tmp_path / "x.png").write_bytes(png())
    path = write_jsonl(tmp_path / "d.jsonl", [record(images=["x.png"])])
    ds = SFTDataset(path, proc)
    (tmp_path / "x.png").unlink()
    with pytest.raises(SampleError, match=re.escape(f"{path}:1")) as info:
        ds[0]
    assert info.value.reason == "missing_image"


def test_bad_policy_arguments(files, proc):
    path = write_jsonl(files / "ok.jsonl", [record()])
    with pytest.raises(ValueError):
        SFTDataset(path, proc, on_bad_sample="ignore")
    with pytest.raises(ValueError):
        SFTDataset(path, proc, overlong="clip")


# ------------------------------------------------------------------------------------------------- eval


def test_eval_pairs(files, proc):
    lines = [record(answer=" red "), record(answer="left"), {"messages": [{"role": "user", "content": "hi"}]}]
    path = write_jsonl(files / "eval.jsonl", lines)
    with pytest.raises(SampleError, match=re.escape(f"{path}:3")):
        EvalDataset(path, proc)
    ds = EvalDataset(path, proc, on_bad_sample="skip")
    assert len(ds) == 2 and dict(ds.report.skipped) == {"no_assistant_turn": 1}
    enc, answer = ds[0]
    assert answer == "red"
    assert proc.decode(enc["input_ids"]).endswith("shape?\n\n<|Assistant|>:")
    assert (enc["labels"] == -100).all()
    batch, answers = collate_eval([ds[0], ds[1]], Collator(proc.pad_id, padding_side="left"))
    assert answers == ["red", "left"] and batch["input_ids"].shape[0] == 2


def test_eval_overlong_follows_on_bad_sample(files, proc):
    path = write_jsonl(files / "eval_long.jsonl", [record(question="<image>" + " word" * 100)])
    with pytest.raises(SampleError) as info:
        EvalDataset(path, proc, max_length=60)
    assert info.value.reason == "overlong"
    assert len(EvalDataset(path, proc, on_bad_sample="skip", max_length=60)) == 0


# ---------------------------------------------------------------------------------------------- fuzzing

IMAGE_NAMES = ["good.png", "missing.png", "empty.png", "corrupt.png", "truncated.png", "subdir", "", "\x00x"]
contents = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["<image>", "<image>\nWhat colour?", "a <image> b <image>", "\ud800", "  ", "<|User|>"]),
    st.integers(),
    st.none(),
)
roles = st.sampled_from(["user", "assistant", "system", "robot", "human", "gpt", "", 3, None])
message = st.one_of(
    st.fixed_dictionaries({"role": roles, "content": contents}),
    st.dictionaries(st.sampled_from(["role", "content", "x"]), contents, max_size=3),
    st.integers(),
)
images = st.one_of(st.lists(st.sampled_from(IMAGE_NAMES) | st.integers(), max_size=3), st.text(max_size=5))
near_valid = st.builds(  # right shape, random images (good or bad), random text: hits the image and length checks
    lambda imgs, q, a: {
        "messages": [{"role": "user", "content": "<image>" * len(imgs) + q}, {"role": "assistant", "content": a}],
        "images": imgs,
    },
    st.lists(st.sampled_from(IMAGE_NAMES), max_size=3),
    st.text(max_size=10),
    st.text(max_size=60),
)
structured = st.one_of(
    near_valid,
    st.fixed_dictionaries({"messages": st.lists(message, max_size=4)}, optional={"images": images}),
    st.fixed_dictionaries(
        {"conversations": st.lists(st.fixed_dictionaries({"from": roles, "value": contents}), max_size=4)},
        optional={"image": images},
    ),
    st.just(record()),
    st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=4), st.lists, max_leaves=5),
)
jsonl_line = st.one_of(
    structured.map(json.dumps),
    st.text(max_size=30).map(lambda s: s.replace("\n", " ")),  # mostly not JSON
)


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lines=st.lists(jsonl_line, min_size=1, max_size=5),
    policy=st.sampled_from(["error", "skip"]),
    max_length=st.sampled_from([None, 40, 200]),
    overlong=st.sampled_from(["skip", "truncate", "error"]),
)
def test_fuzz_jsonl_error_or_counted_skip(files, proc, lines, policy, max_length, overlong):
    path = files / "fuzz.jsonl"
    path.write_bytes("\n".join(lines).encode("utf-8", errors="surrogatepass"))
    try:
        ds = SFTDataset(path, proc, on_bad_sample=policy, max_length=max_length, overlong=overlong)
    except SampleError as e:
        assert policy == "error" or (e.reason == "overlong" and overlong == "error")
        assert re.match(rf"{re.escape(str(path))}:\d+: ", str(e)), str(e)
        return
    assert ds.report.kept + ds.report.num_skipped == ds.report.total <= len(lines)
    assert len(ds) == ds.report.kept
    for i in range(len(ds)):  # everything that passed validation must encode
        try:
            enc = ds[i]
        except SampleError as e:  # but for a truncated file: validation reads headers only (a train-time skip)
            assert e.reason == "corrupt_image" and "truncated.png" in str(e)
            continue
        assert int(enc["images_seq_mask"].sum()) == len(ds.samples[i].image_paths) * N_IMG_TOKENS
        assert max_length is None or len(enc["input_ids"]) <= max_length


@settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=st.lists(structured, max_size=4), policy=st.sampled_from(["error", "skip"]))
def test_fuzz_llava_json(files, proc, records, policy):
    path = files / "fuzz.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    try:
        ds = EvalDataset(path, proc, on_bad_sample=policy)
    except SampleError as e:
        assert policy == "error"
        assert re.match(rf"{re.escape(str(path))}\[\d+\]: ", str(e)), str(e)
        return
    assert ds.report.kept + ds.report.num_skipped == ds.report.total == len(records)
    for i in range(len(ds)):
        try:
            enc, answer = ds[i]
        except SampleError as e:  # validation reads headers only: a truncated file fails when decoded
            assert e.reason == "corrupt_image" and "truncated.png" in str(e)
            continue
        assert isinstance(answer, str) and enc["input_ids"].dtype == torch.long


# ------------------------------------------------------------------------------------------------- demo


def test_demo_data_loads_clean(proc):
    train = SFTDataset(DEMO / "train.jsonl", proc)
    evals = EvalDataset(DEMO / "eval.jsonl", proc)
    assert (len(train), len(evals)) == (512, 64)
    assert train.report.num_skipped == evals.report.num_skipped == 0
    enc = train[0]
    assert enc["images_spatial_crop"].tolist() == [[2, 2]]  # 64x64 on 32-px tiles
    assert evals[0][1] in {"red", "green", "blue", "yellow"}
    assert {s.meta["qtype"] for s in train.samples} == {"colour", "shape", "count", "side", "height"}


def test_demo_data_reproducible(tmp_path):
    spec = importlib.util.spec_from_file_location("make_demo_data", ROOT / "scripts" / "make_demo_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.generate(tmp_path)
    assert module.differences(tmp_path, DEMO) == []
    size = sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file())
    assert size < 5 * 2**20


def test_report_str_empty():
    report = DataReport("x.jsonl", total=2, kept=2)
    assert str(report) == "x.jsonl: 2 records, 2 kept, 0 skipped"
