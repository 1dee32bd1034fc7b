"""Data sources read with Hugging Face `datasets` (deepseek_vl2_lora.data.records): Parquet files, save_to_disk
directories and local copies of Hub dataset repositories, with images as paths or embedded bytes. Each gives the
same encodings as the equivalent native JSONL record with image files."""

import copy
import json

import datasets
import pytest
from test_data import png, write_jsonl
from test_layouts import LAYOUTS, assert_same_encoding, native
from test_train_config import compose_cfg

from deepseek_vl2_lora.data import EvalDataset, SFTDataset, open_source
from deepseek_vl2_lora.data.processor import SampleError
from deepseek_vl2_lora.training import train
from deepseek_vl2_lora.training.metrics import read_metrics
from deepseek_vl2_lora.training.preflight import resolve_data_file

A_PNG = png((10, 200, 30))


def embed(record, image_bytes: bytes, name: str | None = "a.png"):
    """`record` with every "a.png" replaced by an embedded {bytes, path} struct (as Parquet stores images)."""
    struct = {"bytes": image_bytes, "path": name}
    if record == "a.png":
        return struct
    if isinstance(record, dict):
        return {k: embed(v, image_bytes, name) for k, v in record.items()}
    if isinstance(record, list):
        return [embed(v, image_bytes, name) for v in record]
    return record


def arrow_friendly(record: dict) -> dict:
    """OpenAI-style records as a table stores them: every `content` a list of parts (a column has one type)."""
    if not any(isinstance(m.get("content"), list) for m in record.get("messages", [])):
        return record
    messages = [
        m if isinstance(m["content"], list) else {**m, "content": [{"type": "text", "text": m["content"]}]}
        for m in record["messages"]
    ]
    return {**record, "messages": messages}


def to_parquet(path, records: list[dict], features=None):
    datasets.Dataset.from_list(records, features=features).to_parquet(str(path))
    return path


@pytest.fixture
def data_dir(tmp_path):
    (tmp_path / "a.png").write_bytes(A_PNG)
    return tmp_path


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_parquet_with_embedded_images_encodes_like_native_jsonl(name, data_dir, proc):
    record, equivalent, added = LAYOUTS[name]
    # The embedded bytes win over the struct's path: the path names a file that does not exist.
    parquet = to_parquet(data_dir / f"{name}.parquet", [arrow_friendly(embed(record, A_PNG, "nowhere/a.png"))] * 2)
    ds = SFTDataset(parquet, proc)
    ref = SFTDataset(write_jsonl(data_dir / "native.jsonl", [equivalent]), proc)
    assert ds.source.kind == "parquet" and ds.report.kept == 2 and ds.report.placeholders_added == 2 * added
    assert_same_encoding(ds[0], ref[0])
    assert_same_encoding(ds[1], ref[0])
    assert ds.samples[1].location == f"{parquet}[1]"


@pytest.mark.parametrize("name", ["llava", "the_cauldron", "swift"])
def test_parquet_with_image_paths_reads_files_next_to_it(name, data_dir, proc):
    record, equivalent, _ = LAYOUTS[name]
    ds = SFTDataset(to_parquet(data_dir / f"{name}.parquet", [record]), proc)
    ref = SFTDataset(write_jsonl(data_dir / "native.jsonl", [equivalent]), proc)
    assert ds.samples[0].image_paths == [data_dir / "a.png"]
    assert_same_encoding(ds[0], ref[0])


def test_datasets_image_feature_columns_stay_undecoded(data_dir, proc):
    """A the_cauldron-style table with a `datasets` Image feature (what the Hub's parquet files declare)."""
    record, equivalent, _ = LAYOUTS["the_cauldron"]
    features = datasets.Features(
        {
            "images": datasets.List(datasets.Image()),
            "texts": datasets.List(
                {
                    "user": datasets.Value("string"),
                    "assistant": datasets.Value("string"),
                    "source": datasets.Value("string"),
                }
            ),
        }
    )
    rows = [embed(record, A_PNG, None)]
    rows[0]["texts"][1]["source"] = None
    parquet = to_parquet(data_dir / "cauldron.parquet", rows, features)
    assert isinstance(datasets.Dataset.from_parquet(str(parquet)).features["images"].feature, datasets.Image)
    ds = SFTDataset(parquet, proc)
    ref = SFTDataset(write_jsonl(data_dir / "native.jsonl", [equivalent]), proc)
    assert_same_encoding(ds[0], ref[0])
    assert ds.samples[0].images[0].data == A_PNG


def test_save_to_disk_and_hub_directories_pick_their_splits(data_dir, proc):
    train_rows = [embed(native(), A_PNG)] * 3
    eval_rows = [embed(native(), A_PNG)] * 2
    splits = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(train_rows), "test": datasets.Dataset.from_list(eval_rows)}
    )
    splits.save_to_disk(str(data_dir / "saved"))
    hub = data_dir / "hub_copy"  # a Hub dataset repository's usual layout: data/<split>-XXXXX-of-XXXXX.parquet
    (hub / "data").mkdir(parents=True)
    splits["train"].to_parquet(str(hub / "data" / "train-00000-of-00001.parquet"))
    splits["test"].to_parquet(str(hub / "data" / "test-00000-of-00001.parquet"))
    ref = SFTDataset(write_jsonl(data_dir / "native.jsonl", [native()]), proc)
    for directory, kind in ((data_dir / "saved", "arrow"), (hub, "hub")):
        train_set = SFTDataset(directory, proc)
        eval_set = EvalDataset(directory, proc)  # eval: validation / val / test
        assert (train_set.source.kind, len(train_set), len(eval_set)) == (kind, 3, 2)
        assert train_set.samples[2].location == f"{directory}[train][2]"
        assert_same_encoding(train_set[2], ref[0])
        assert eval_set.answer(1) == native()["messages"][-1]["content"]
        assert len(SFTDataset(directory, proc, split="test")) == 2
        with pytest.raises(SampleError, match=r"no split 'dev' \(it has train, test\); fix data.train_split"):
            SFTDataset(directory, proc, split="dev")
    # A single saved Dataset has no splits to choose from.
    splits["train"].save_to_disk(str(data_dir / "one"))
    assert len(SFTDataset(data_dir / "one", proc)) == 3


def test_hub_repository_with_several_subsets_names_them(data_dir, proc):
    """A Hub repository whose README declares one config per subset directory (as the_cauldron does)."""
    repo = data_dir / "cauldron"
    for subset in ("ai2d", "chart"):
        (repo / subset).mkdir(parents=True)
        to_parquet(repo / subset / "train-00000-of-00001.parquet", [embed(native(), A_PNG)])
    configs = "".join(
        f"- config_name: {s}\n  data_files:\n  - split: train\n    path: {s}/train-*\n" for s in ("ai2d", "chart")
    )
    (repo / "README.md").write_text(f"---\nconfigs:\n{configs}---\n")
    with pytest.raises(SampleError, match=r"several subsets \(ai2d, chart\); give one subset's own directory"):
        SFTDataset(repo, proc)
    assert len(SFTDataset(repo / "chart", proc)) == 1


def test_several_splits_without_a_usual_name_must_be_chosen(data_dir, proc):
    rows = [embed(native(), A_PNG)]
    datasets.DatasetDict(
        {"part_a": datasets.Dataset.from_list(rows), "part_b": datasets.Dataset.from_list(rows)}
    ).save_to_disk(str(data_dir / "odd"))
    with pytest.raises(SampleError, match=r"several splits \(part_a, part_b\); choose one with data.eval_split=NAME"):
        EvalDataset(data_dir / "odd", proc)


def test_bad_rows_are_skipped_by_row_and_bad_files_are_one_line(data_dir, proc):
    good = embed(native(), A_PNG)
    broken = copy.deepcopy(good)
    broken["images"][0]["bytes"] = b"not an image"
    unplaced = copy.deepcopy(good)
    unplaced["messages"][1]["content"] = "<image>\n<image>\nfirst"  # 2 placeholders, 1 image (native: strict)
    parquet = to_parquet(data_dir / "rows.parquet", [good, broken, good, unplaced])
    with pytest.raises(SampleError, match=rf"{parquet}\[1\]: cannot (read|decode) image embedded image a.png"):
        SFTDataset(parquet, proc)
    ds = SFTDataset(parquet, proc, on_bad_sample="skip")
    assert ds.rows == [0, 2] and dict(ds.report.skipped) == {"corrupt_image": 1, "image_count_mismatch": 1}
    (data_dir / "junk.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(SampleError, match=r"junk.parquet: cannot read as parquet") as info:
        SFTDataset(data_dir / "junk.parquet", proc)
    assert "\n" not in str(info.value)
    (data_dir / "empty_dir").mkdir()
    with pytest.raises(SampleError, match="cannot read as a dataset directory"):
        open_source(data_dir / "empty_dir")
    with pytest.raises(SampleError, match=r"must be .jsonl, .json or .parquet, or a dataset directory"):
        open_source(data_dir / "a.png")


def test_embedded_image_struct_checks(data_dir, proc):
    bad = {"messages": native()["messages"], "images": [{"bytes": None, "path": None}]}
    url = {"messages": native()["messages"], "images": [{"bytes": None, "path": "https://x.org/a.png"}]}
    path_only = {"messages": native()["messages"], "images": [{"bytes": None, "path": "a.png"}]}
    ds = SFTDataset(write_jsonl(data_dir / "structs.jsonl", [bad, url, path_only]), proc, on_bad_sample="skip")
    assert dict(ds.report.skipped) == {"bad_schema": 1, "image_url": 1}
    assert ds.samples[0].image_paths == [data_dir / "a.png"]  # a struct without bytes is read from its path


def test_training_from_parquet_equals_training_from_jsonl(tmp_path, tmp_path_factory, monkeypatch):
    """The demo set as a Parquet file with every image embedded trains exactly as the JSONL with image files (also
    read in DataLoader worker processes, which get the memory-mapped source by reference)."""
    monkeypatch.setenv("DEEPSEEK_VL2_LORA_CACHE", str(tmp_path_factory.getbasetemp() / "tiny_cache"))
    demo = resolve_data_file("data/demo/train.jsonl")
    rows = []
    for line in demo.read_text().splitlines()[:16]:
        record = json.loads(line)
        record["images"] = [
            {"bytes": (demo.parent / p).read_bytes(), "path": None} for p in record["images"]
        ]  # fmt: skip
        rows.append(record)
    parquet = to_parquet(tmp_path / "demo_train.parquet", rows)
    overrides = ("experiment=smoke", "data.eval_path=null", "trainer.eval_before=false", "logger=jsonl")
    losses = []
    runs = (("jsonl", demo, 0), ("parquet", parquet, 0), ("parquet_workers", parquet, 2))  # workers get the rows
    for name, path, workers in runs:
        cfg = compose_cfg(*overrides, f"data.train_path={path}", f"data.num_workers={workers}")
        train(cfg, tmp_path / name)
        losses.append([r["train/loss"] for r in read_metrics(tmp_path / name, "train")])
        report = json.loads((tmp_path / name / "data_report.json").read_text())
        assert report["train"]["layout"] == "messages"
    assert len(losses[0]) == 3 and losses[0] == losses[1] == losses[2]
