"""Fast, cached data validation: header-only image checks, the per-image and per-source cache, rank sharing,
the pixel limit (reject / resize once) and the `python -m deepseek_vl2_lora.data check` CLI."""

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image, ImageFile, ImageOps

from deepseek_vl2_lora.data import EvalDataset, SFTDataset, load_image, validation_cache
from deepseek_vl2_lora.data import images as images_module
from deepseek_vl2_lora.data.check import main as check_main
from deepseek_vl2_lora.data.images import ImageRef, probe_image
from deepseek_vl2_lora.data.processor import SampleError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _fresh_process(monkeypatch):
    """Each test starts like a new process: no image headers in memory, local rank 0."""
    validation_cache._IMAGE_CACHES.clear()
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    yield
    validation_cache._IMAGE_CACHES.clear()


def save_image(path: Path, size=(16, 16), fmt="PNG", exif=None, colour=(200, 30, 30)) -> Path:
    image = Image.new("RGB", size, colour)
    image.paste((10, 10, 250), (0, 0, size[0] // 2, size[1] // 3))  # not symmetric: rotations show
    kwargs = {"exif": exif} if exif is not None else {}
    image.save(path, format=fmt, **kwargs)
    return path


def record(images=("a.png",), answer="red"):
    q = "<image>" * len(images) + "\nWhat colour?"
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer}],
            "images": list(images)}  # fmt: skip


def write_jsonl(path: Path, lines) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def age(*paths: Path, seconds: float = 60.0) -> None:
    """Set mtimes in the past (files written in the last second are not cached: their stamp may not change)."""
    for p in paths:
        t = time.time_ns() - int(seconds * 1e9)
        os.utime(p, ns=(t, t))


def counting(monkeypatch, obj, name):
    calls = []
    original = getattr(obj, name)

    def wrapper(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(obj, name, wrapper)
    return calls


def data_dir(tmp_path: Path, n: int = 6) -> tuple[Path, Path]:
    d = tmp_path / "d"
    d.mkdir()
    for i in range(n):
        save_image(d / f"{i}.png", size=(16 + 8 * i, 16))
    lines = [record([f"{i}.png"]) for i in range(n)]
    lines.insert(2, record(["missing.png"]))  # line 3
    lines.insert(4, "not json")  # line 5
    path = write_jsonl(d / "train.jsonl", lines)
    age(*d.iterdir())
    return d, path


# ------------------------------------------------------------------------------------------------ header probe


def test_probe_reads_the_decoded_size_from_the_header_with_exif_rotation(tmp_path, monkeypatch):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90°: width and height swap
    jpg = save_image(tmp_path / "r.jpg", size=(40, 20), fmt="JPEG", exif=exif)
    png = save_image(tmp_path / "r.png", size=(40, 20), fmt="PNG", exif=exif)
    plain = save_image(tmp_path / "p.png", size=(30, 10))
    decoded = {p: (load_image(p).size, load_image(p, exif_transpose=True).size) for p in (jpg, png, plain)}
    assert decoded == {jpg: ((40, 20), (20, 40)), png: ((40, 20), (20, 40)), plain: ((30, 10), (30, 10))}
    with Image.open(jpg) as im:
        assert ImageOps.exif_transpose(im).size == (20, 40)

    def no_pixels(self, *a, **k):
        raise AssertionError("probe_image decoded pixels")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_pixels)
    for p in (jpg, png, plain):
        assert (probe_image(p), probe_image(p, exif_transpose=True)) == decoded[p]
    assert probe_image(ImageRef(None, jpg.read_bytes()), exif_transpose=True) == (20, 40)
    for name, content, reason in [("e.png", b"", "empty_image"), ("c.png", b"not an image", "corrupt_image")]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(SampleError) as info:
            probe_image(tmp_path / name)
        assert info.value.reason == reason
    with pytest.raises(SampleError) as info:
        probe_image(tmp_path / "nope.png")
    assert info.value.reason == "missing_image"


# ------------------------------------------------------------------------------------------------ the cache


def test_second_construction_decodes_nothing_and_gives_the_same_dataset(tmp_path, proc, monkeypatch):
    d, path = data_dir(tmp_path)
    cache = tmp_path / "cache"
    first = SFTDataset(path, proc, on_bad_sample="skip", cache_dir=cache)
    assert first.rows == [0, 1, 3, 5, 6, 7] and dict(first.report.skipped) == {"missing_image": 1, "malformed_json": 1}
    assert [x["location"] for x in first.report.skipped_lines] == [f"{path}:3", f"{path}:5"]
    validation_cache._IMAGE_CACHES.clear()  # a new process
    opens, checks = counting(monkeypatch, Image, "open"), counting(monkeypatch, proc, "check")
    second = SFTDataset(path, proc, on_bad_sample="skip", cache_dir=cache)
    assert (len(opens), len(checks)) == (0, 0)
    assert second.rows == first.rows and second.report.to_dict() == first.report.to_dict()
    assert second.report.skipped_lines == first.report.skipped_lines
    assert second[0]["input_ids"].tolist() == first[0]["input_ids"].tolist()
    # any setting that changes the outcome is a different entry: validated again
    SFTDataset(path, proc, on_bad_sample="skip", max_length=4000, cache_dir=cache)
    assert len(checks) == 6
    # no cache: validated every time
    SFTDataset(path, proc, on_bad_sample="skip", cache_dir=False)
    assert len(checks) == 12


def test_a_changed_image_revalidates_only_its_record(tmp_path, proc, monkeypatch):
    d, path = data_dir(tmp_path)
    cache = tmp_path / "cache"
    SFTDataset(path, proc, on_bad_sample="skip", cache_dir=cache)
    validation_cache._IMAGE_CACHES.clear()
    (d / "3.png").write_bytes(b"broken now")  # row 5 (line 6) names it
    age(d / "3.png", seconds=30)
    opens, checks = counting(monkeypatch, Image, "open"), counting(monkeypatch, proc, "check")
    ds = SFTDataset(path, proc, on_bad_sample="skip", cache_dir=cache)
    assert len(opens) == 1 and len(checks) == 0  # the one header; that record now fails before tokenizing
    assert ds.rows == [0, 1, 3, 6, 7] and ds.report.skipped["corrupt_image"] == 1
    assert ds.report.skipped_lines[-1]["location"] == f"{path}:6"
    validation_cache._IMAGE_CACHES.clear()
    opens.clear()
    again = SFTDataset(path, proc, on_bad_sample="skip", cache_dir=cache)  # the revalidation was saved
    assert len(opens) == 0 and again.rows == ds.rows
    # the missing image appears: its record is checked again and kept
    save_image(d / "missing.png")
    age(d / "missing.png")
    validation_cache._IMAGE_CACHES.clear()
    assert SFTDataset(path, proc, on_bad_sample="skip", cache_dir=cache).rows == [0, 1, 2, 3, 6, 7]
    assert len(checks) == 1


def test_a_data_file_written_just_now_is_not_cached(tmp_path, proc, monkeypatch):
    d, path = data_dir(tmp_path)
    cache = tmp_path / "cache"
    write_jsonl(path, [record(["0.png"])])  # mtime now: may change again within its mtime's granularity
    SFTDataset(path, proc, cache_dir=cache)
    (entry,) = (cache / "sources").glob("*.json")
    assert json.loads(entry.read_text())["racy"] is True  # for this run's waiting ranks only
    checks = counting(monkeypatch, proc, "check")
    SFTDataset(path, proc, cache_dir=cache)  # a later start validates again
    assert len(checks) == 1 and json.loads(entry.read_text())["racy"] is True
    age(path)  # (a new stamp: a new entry)
    SFTDataset(path, proc, cache_dir=cache)
    racy = sorted(json.loads(p.read_text())["racy"] for p in (cache / "sources").glob("*.json"))
    assert len(checks) == 2 and racy == [False, True]
    SFTDataset(path, proc, cache_dir=cache)
    assert len(checks) == 2


def test_a_corrupt_cache_entry_is_a_warning_and_a_miss(tmp_path, proc, caplog):
    d, path = data_dir(tmp_path)
    cache = tmp_path / "cache"
    first = SFTDataset(path, proc, on_bad_sample="skip", cache_dir=cache)
    (entry,) = (cache / "sources").glob("*.json")
    entry.write_text('{"version": 1, "outcomes": [[')
    for shard in (cache / "images").glob("*.json"):
        shard.write_bytes(b"\x00\xff garbage")
    validation_cache._IMAGE_CACHES.clear()
    with caplog.at_level(logging.WARNING):
        again = SFTDataset(path, proc, on_bad_sample="skip", cache_dir=cache)
    assert again.rows == first.rows and again.report.to_dict() == first.report.to_dict()
    warned = [r.getMessage() for r in caplog.records if "unreadable validation cache entry" in r.getMessage()]
    assert any(str(entry) in m for m in warned) and len(warned) >= 2
    assert json.loads(entry.read_text())["outcomes"]  # rebuilt
    for wrong in ({"version": 1, "outcomes": [[0]] * 8}, {"version": 1, "outcomes": [[0]], "layout": None,
                                                          "images": [], "row_images": {}}):  # fmt: skip
        entry.write_text(json.dumps(wrong))  # valid JSON, not this source's entry
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert SFTDataset(path, proc, on_bad_sample="skip", cache_dir=cache).rows == first.rows
        assert any("ignoring validation cache entry" in r.getMessage() for r in caplog.records)


def test_cache_files_follow_the_umask(tmp_path, proc):
    d, path = data_dir(tmp_path)
    old = os.umask(0o027)
    try:
        SFTDataset(path, proc, on_bad_sample="skip", cache_dir=tmp_path / "cache")
    finally:
        os.umask(old)
    (entry,) = (tmp_path / "cache" / "sources").glob("*.json")
    assert entry.stat().st_mode & 0o777 == 0o640


def test_the_eval_file_second_dataset_opens_no_image(tmp_path, proc, monkeypatch):
    d, path = data_dir(tmp_path)
    SFTDataset(path, proc, on_bad_sample="skip", overlong="skip", cache_dir=False)  # the eval loss set
    opens = counting(monkeypatch, Image, "open")
    gen = EvalDataset(path, proc, on_bad_sample="skip", cache_dir=False)  # the generation set
    assert len(opens) == 0 and len(gen) == 6


# ------------------------------------------------------------------------------------------------ ranks


def test_a_nonzero_local_rank_waits_for_rank_0s_entry(tmp_path, proc, proc_dir):
    d, path = data_dir(tmp_path)
    cache = tmp_path / "cache"
    code = f"""
import json, logging, sys
from PIL import Image
from deepseek_vl2_lora.data import SFTDataset
from deepseek_vl2_lora.data.processor import DeepseekVL2Processor
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
proc = DeepseekVL2Processor.from_pretrained({str(proc_dir)!r})
opens = []
real_open = Image.open
Image.open = lambda *a, **k: opens.append(a) or real_open(*a, **k)
proc.check = lambda *a, **k: opens.append("check")
ds = SFTDataset({str(path)!r}, proc, on_bad_sample="skip", cache_dir={str(cache)!r})
print(json.dumps({{"rows": ds.rows, "report": ds.report.to_dict(), "opened": len(opens)}}))
"""
    env = {**os.environ, "LOCAL_RANK": "1", "PYTHONPATH": str(ROOT)}
    waiter = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)  # fmt: skip
    try:
        deadline = time.time() + 120
        while True:  # until it is waiting: nothing is in the cache yet
            line = waiter.stderr.readline()
            assert line or waiter.poll() is None, waiter.stderr.read()
            if "waiting for local rank 0" in line:
                break
            assert time.time() < deadline
        time.sleep(0.5)
        assert waiter.poll() is None  # still waiting
        ours = SFTDataset(path, proc, on_bad_sample="skip", cache_dir=cache)  # local rank 0
        out, err = waiter.communicate(timeout=120)
    finally:
        waiter.kill()
    assert waiter.returncode == 0, err
    theirs = json.loads(out.strip().splitlines()[-1])
    assert theirs["opened"] == 0
    assert theirs["rows"] == ours.rows and theirs["report"] == json.loads(json.dumps(ours.report.to_dict()))


def test_a_waiting_rank_times_out_or_gets_rank_0s_error(tmp_path, proc, monkeypatch):
    d, path = data_dir(tmp_path)
    cache = tmp_path / "cache"
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(validation_cache, "WAIT_STALL_S", 0.5)
    with pytest.raises(RuntimeError, match="waited .* for local rank 0 to validate the data"):
        SFTDataset(path, proc, cache_dir=cache)
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(SampleError, match=f"{path}:3: image not found"):  # on_bad_sample=error
        SFTDataset(path, proc, cache_dir=cache)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(SampleError, match=f"{path}:3: image not found"):  # rank 0's error, at once
        SFTDataset(path, proc, cache_dir=cache)


# ------------------------------------------------------------------------------------------------ pixel limit


def test_images_above_the_pixel_limit_are_rejected(tmp_path, proc):
    d = tmp_path / "d"
    d.mkdir()
    save_image(d / "big.png", size=(40, 30))  # 1200 pixels
    save_image(d / "ok.png", size=(20, 20))
    path = write_jsonl(d / "t.jsonl", [record(["ok.png"]), record(["big.png"])])
    with pytest.raises(SampleError) as info:
        SFTDataset(path, proc, max_image_pixels=1000, cache_dir=False)
    assert info.value.reason == "image_too_large" and str(info.value).startswith(f"{path}:2: ")
    assert "data.max_image_pixels=1,000" in str(info.value) and "data.large_image=resize" in str(info.value)
    ds = SFTDataset(path, proc, on_bad_sample="skip", max_image_pixels=1000, cache_dir=False)
    assert ds.rows == [0] and dict(ds.report.skipped) == {"image_too_large": 1}
    assert len(SFTDataset(path, proc, max_image_pixels=1200, cache_dir=False)) == 2  # the limit is inclusive


def test_large_images_are_resized_once(tmp_path, proc, monkeypatch, caplog):
    d = tmp_path / "d"
    d.mkdir()
    save_image(d / "big.jpg", size=(40, 30), fmt="JPEG")  # 1200 pixels
    path = write_jsonl(d / "t.jsonl", [record(["big.jpg"])])
    age(d / "big.jpg", path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL's own bomb check would raise (> 2 × 100)
    cache = tmp_path / "cache"
    with caplog.at_level(logging.WARNING):
        ds = SFTDataset(path, proc, max_image_pixels=1000, large_image="resize", cache_dir=cache)
        assert len(ds) == 1
        (copy,) = (cache / "resized").iterdir()

        def no_decode(*a, **k):
            raise AssertionError("the original image was decoded again")

        monkeypatch.setattr(images_module, "_shrink", no_decode)
        monkeypatch.setattr(images_module, "_decode", no_decode)
        loaded = load_image(d / "big.jpg", limits=ds.limits)
        assert loaded.size == (36, 27)  # 972 pixels ≤ 1000, aspect 4:3 kept
        validation_cache._IMAGE_CACHES.clear()
        again = SFTDataset(path, proc, max_image_pixels=1000, large_image="resize", cache_dir=cache)
        assert Image.MAX_IMAGE_PIXELS == 100  # PIL's limit restored after each use
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 89_478_485)  # (the tile crops are checked by PIL too)
        for dataset in (ds, again):  # training visits read the copy
            assert dataset[0]["images_seq_mask"].sum() > 0
    assert [p.name for p in (cache / "resized").iterdir()] == [copy.name]
    resized = [r for r in caplog.records if "resized once" in r.getMessage()]
    assert len(resized) == 1 and "big.jpg" in resized[0].getMessage()
    # a large image damaged past its header: found when it is resized, a bad record like any other
    save_image(d / "big.png", size=(40, 30))
    (d / "cut.png").write_bytes((d / "big.png").read_bytes()[:60])  # a sound header (probe_image reads it)
    assert probe_image(d / "cut.png") == (40, 30)
    path = write_jsonl(d / "t2.jsonl", [record(["big.jpg"]), record(["cut.png"])])
    ds = SFTDataset(path, proc, on_bad_sample="skip", max_image_pixels=1000, large_image="resize", cache_dir=cache)
    assert ds.rows == [0] and dict(ds.report.skipped) == {"corrupt_image": 1}


# ------------------------------------------------------------------------------------------------ check CLI


def test_check_cli_lists_every_bad_line(tmp_path, proc_dir, capsys):
    d = tmp_path / "d"
    d.mkdir()
    save_image(d / "a.png")
    (d / "bad.png").write_bytes(b"not an image")
    lines = [record(), record(["missing.png"]), "{broken", record(), record(["bad.png"]), record(["missing.png"]),
             {"messages": "x"}, dict(record(["a.png", "a.png"]), images=["a.png"])]  # fmt: skip
    bad = write_jsonl(d / "bad.jsonl", lines)
    good = write_jsonl(d / "good.jsonl", [record(), record(answer="blue")])
    report = tmp_path / "out" / "report.jsonl"
    argv = ["check", str(bad), str(good), "--model", str(proc_dir), "--report", str(report), "--cache-dir", "none"]
    assert check_main(argv) == 1
    found = [json.loads(x) for x in report.read_text().splitlines()]
    assert [(x["location"], x["reason"]) for x in found] == [
        (f"{bad}:2", "missing_image"),
        (f"{bad}:3", "malformed_json"),
        (f"{bad}:5", "corrupt_image"),
        (f"{bad}:6", "missing_image"),
        (f"{bad}:7", "bad_schema"),
        (f"{bad}:8", "image_count_mismatch"),
    ]
    assert all(x["file"] == str(bad) and x["message"] for x in found)
    out = capsys.readouterr().out
    assert f"{bad}: 8 records, 2 good, 6 bad" in out and "missing_image: 2" in out and f"{good}: 2 records" in out
    assert check_main(["check", str(good), "--model", str(proc_dir), "--report", str(report)]) == 0
    assert report.read_text() == ""
    assert check_main(["check", str(good), "--model", str(tmp_path), "--report", str(report)]) == 2  # no processor
    assert "processor_config.json: file not found" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ run dir


def test_the_run_lists_every_skipped_line(tmp_path, proc):
    from deepseek_vl2_lora.training.run import SKIPPED_FILE, _write_skipped

    d = tmp_path / "d"
    d.mkdir()
    save_image(d / "a.png")
    path = write_jsonl(d / "t.jsonl", [record()] + [record([f"gone{i}.png"]) for i in range(5)])
    ds = SFTDataset(path, proc, on_bad_sample="skip", cache_dir=False)
    assert len(ds.report.examples["missing_image"]) == 3  # the console and data_report.json: 3 examples
    ds.report.skip_at_train(f"{path}:1: image not found [missing_image]", "missing_image")
    out = tmp_path / SKIPPED_FILE
    out.write_text(json.dumps({"stage": "train", "line": "from an earlier run"}) + "\n")  # kept on resume
    _write_skipped(out, {"train": ds.report})
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x.get("location") for x in lines] == [f"{path}:{i}" for i in range(2, 7)] + [None]
    assert {x["reason"] for x in lines[:5]} == {"missing_image"} and lines[0]["split"] == "train"
    assert lines[-1]["line"] == "from an earlier run"
    assert ds.report.skipped_records("train")[-1]["stage"] == "train"


def test_config_keys_are_checked_and_reach_the_datasets(tmp_path):
    from hydra import compose, initialize_config_dir

    from deepseek_vl2_lora.training.config import ConfigError, check_config
    from deepseek_vl2_lora.training.preflight import dataset_options

    def compose_cfg(*overrides):
        with initialize_config_dir(config_dir=str(ROOT / "deepseek_vl2_lora" / "configs"), version_base="1.3"):
            return compose("train", overrides=list(overrides))

    cfg = compose_cfg()
    assert (cfg.data.max_image_pixels, cfg.data.large_image, cfg.data.cache_dir) == (89_478_485, "reject", None)
    bad = compose_cfg("data.large_image=shrink", "data.max_image_pixels=0", "data.cache_dir=true")
    with pytest.raises(ConfigError) as info:
        check_config(bad)
    for key in ("data.large_image='shrink'", "data.max_image_pixels=0", "data.cache_dir=True"):
        assert key in str(info.value)
    cfg = compose_cfg("data.large_image=resize", "data.max_image_pixels=null", f"data.cache_dir={tmp_path}")
    check_config(cfg)
    options = dataset_options(cfg.data, processor=None)
    chosen = (options["max_image_pixels"], options["large_image"], options["cache_dir"])
    assert chosen == (None, "resize", str(tmp_path))
    assert validation_cache.resolve_cache_dir(compose_cfg("data.cache_dir=false").data.cache_dir) is None
    assert validation_cache.resolve_cache_dir("none") is None
