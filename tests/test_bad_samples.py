"""Samples that go bad after the start-up check (an image deleted mid-run): a counted skip, or one error line."""

import json
import shutil

import pytest
from test_train_config import compose_cfg

from deepseek_vl2_lora import REPO_ROOT
from deepseek_vl2_lora.data import SkipBadSamples
from deepseek_vl2_lora.data.processor import SampleError
from deepseek_vl2_lora.training import USER_ERRORS, train
from deepseek_vl2_lora.training import run as trainer_run
from deepseek_vl2_lora.training.metrics import read_metrics

N = 16


@pytest.fixture(autouse=True)
def tiny_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DEEPSEEK_VL2_LORA_CACHE", str(tmp_path_factory.getbasetemp() / "tiny_cache"))
    monkeypatch.setenv("WANDB_MODE", "disabled")


@pytest.fixture
def data_dir(tmp_path):
    """The first 16 demo training records with their images, in a directory of their own."""
    src = REPO_ROOT / "data" / "demo"
    lines = (src / "train.jsonl").read_text().splitlines()[:N]
    (tmp_path / "data" / "images").mkdir(parents=True)
    for line in lines:
        for image in json.loads(line)["images"]:
            shutil.copy(src / image, tmp_path / "data" / image)
    (tmp_path / "data" / "train.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "data"


def delete_images_after_setup(monkeypatch, data_dir, count):
    """Delete the first `count` images once the data is validated (in _plan_steps, before the first batch)."""
    plan = trainer_run._plan_steps

    def plan_then_delete(*args, **kwargs):
        for path in sorted((data_dir / "images").iterdir())[:count]:
            path.unlink()
        return plan(*args, **kwargs)

    monkeypatch.setattr(trainer_run, "_plan_steps", plan_then_delete)


def compose(data_dir, *overrides):
    return compose_cfg(
        "experiment=smoke", f"data.train_path={data_dir / 'train.jsonl'}", "data.eval_path=null", *overrides
    )


@pytest.mark.parametrize("workers", [0, 2])
def test_image_deleted_mid_run_is_a_counted_skip(tmp_path, data_dir, monkeypatch, workers):
    delete_images_after_setup(monkeypatch, data_dir, 8)  # half the set: every step's batch meets one
    cfg = compose(data_dir, "data.on_bad_sample=skip", "trainer.log_every=1", f"data.num_workers={workers}")
    result = train(cfg, tmp_path / "run")
    assert result.steps == 3
    records = read_metrics(tmp_path / "run", "train")
    assert all(r["train/samples"] == cfg.trainer.micro_batch_size for r in records)  # batches stay full
    counts = [r["data/skipped_at_train"] for r in records]
    assert counts == sorted(counts) and counts[-1] > 0
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())["train"]
    assert sum(report["skipped_at_train"].values()) == counts[-1]
    assert set(report["skipped_at_train"]) == {"missing_image"}
    listed = [json.loads(x) for x in (tmp_path / "run" / "data_skipped.jsonl").read_text().splitlines()]
    assert len(listed) == counts[-1] and {x["stage"] for x in listed} == {"train"}  # every one, by line
    assert all(x["reason"] == "missing_image" and "train.jsonl:" in x["line"] for x in listed)


@pytest.mark.parametrize("workers", [0, 2])
def test_image_deleted_mid_run_is_one_error_line(tmp_path, data_dir, monkeypatch, workers):
    delete_images_after_setup(monkeypatch, data_dir, N)
    cfg = compose(data_dir, f"data.num_workers={workers}")
    with pytest.raises(SampleError) as info:
        train(cfg, tmp_path / "run")
    message = str(info.value)
    assert isinstance(info.value, USER_ERRORS)
    assert "\n" not in message and "Traceback" not in message
    assert f"{data_dir / 'train.jsonl'}:" in message and "image not found" in message


class Flaky:
    """A dataset whose listed indices fail."""

    def __init__(self, bad):
        self.bad = bad

    def __len__(self):
        return 5

    def __getitem__(self, i):
        if i in self.bad:
            raise SampleError("missing_image", f"image {i} not found", f"f.jsonl:{i + 1}")
        return {"i": i}


def test_skip_substitutes_the_next_index_deterministically():
    items = SkipBadSamples(Flaky({1, 2, 4}), "skip")
    assert items[0].encoding == {"i": 0} and items[0].skipped == []
    assert items[1].encoding == {"i": 3} and items[1].reasons == ["missing_image", "missing_image"]
    assert items[4].encoding == {"i": 0} and items[4].skipped == ["f.jsonl:5: image 4 not found [missing_image]"]
    error = SkipBadSamples(Flaky({1}), "error")[1]
    assert error.encoding is None and error.skipped == ["f.jsonl:2: image 1 not found [missing_image]"]
    assert SkipBadSamples(Flaky(set(range(5))), "skip")[0].encoding is None


def test_eval_image_deleted_mid_run_is_a_counted_skip(tmp_path, data_dir, monkeypatch):
    """The eval split (here the training file) loses half its images after validation: under skip, eval leaves those
    samples out and counts them, and its numbers equal an eval of only the intact records; under error, one line."""
    train_file = data_dir / "train.jsonl"
    deleted = sorted((data_dir / "images").iterdir())[:8]
    delete_images_after_setup(monkeypatch, data_dir, 8)
    overrides = (
        "data.on_bad_sample=skip",
        f"data.eval_path={train_file}",
        "data.eval_limit=null",
        "trainer.max_steps=1",
    )
    train(compose(data_dir, *overrides), tmp_path / "skip")
    before = [r for r in read_metrics(tmp_path / "skip", "eval") if r["eval/tag"] == "before"][0]
    # Reference: the same files with the images already gone, so validation drops those records at the start.
    monkeypatch.undo()
    monkeypatch.setenv("DEEPSEEK_VL2_LORA_CACHE", str(tmp_path.parent / "tiny_cache_ref"))
    train(compose(data_dir, *overrides), tmp_path / "ref")
    report = json.loads((tmp_path / "ref" / "data_report.json").read_text())["eval"]
    reference = [r for r in read_metrics(tmp_path / "ref", "eval") if r["eval/tag"] == "before"][0]
    kept = report["kept"]
    assert 0 < kept < N and before["eval/samples"] == reference["eval/samples"] == kept
    assert before["eval/skipped"] == 2 * (N - kept)  # the loss pass and the generation pass each meet them
    assert "eval/skipped" not in reference
    assert before["eval/accuracy"] == reference["eval/accuracy"]
    assert before["eval/loss"] == pytest.approx(reference["eval/loss"], rel=1e-5)

    for path in deleted:  # restore them, to be deleted again after validation
        shutil.copy(REPO_ROOT / "data" / "demo" / "images" / path.name, path)
    delete_images_after_setup(monkeypatch, data_dir, 8)
    with pytest.raises(SampleError) as info:  # the same under on_bad_sample=error: one line naming the record
        train(compose(data_dir, f"data.eval_path={train_file}", "trainer.max_steps=1"), tmp_path / "error")
    assert "\n" not in str(info.value) and "while evaluating" in str(info.value) and f"{train_file}:" in str(info.value)
