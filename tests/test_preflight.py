"""Config and data mistakes are one-line user errors naming the file or key, before the model loads."""

import json
import shutil

import pytest
from test_train_config import compose_cfg

from deepseek_vl2_lora.model import DeepseekVL2ForCausalLM
from deepseek_vl2_lora.model.tiny import ensure_tiny_checkpoint
from deepseek_vl2_lora.training import USER_ERRORS, train
from deepseek_vl2_lora.training import run as trainer_run
from deepseek_vl2_lora.training.preflight import read_safetensors_header


@pytest.fixture(autouse=True)
def no_model_load(tmp_path_factory, monkeypatch):
    """Every test here must fail before the model loads: loading it fails the test."""
    monkeypatch.setenv("DEEPSEEK_VL2_LORA_CACHE", str(tmp_path_factory.getbasetemp() / "tiny_cache"))
    monkeypatch.setenv("WANDB_MODE", "disabled")

    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the mistake was reported")

    monkeypatch.setattr(trainer_run, "load_model", load_model)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """The tiny checkpoint re-saved in several shards (with an index), processor and tokenizer files next to it."""
    import os

    os.environ.setdefault("DEEPSEEK_VL2_LORA_CACHE", str(tmp_path_factory.getbasetemp() / "tiny_cache"))
    tiny = ensure_tiny_checkpoint("full-noaux", seed=0)
    out = tmp_path_factory.mktemp("sharded") / "ckpt"
    extra = [p for p in tiny.iterdir() if p.name.startswith(("tokenizer", "processor", "special"))]
    DeepseekVL2ForCausalLM.from_pretrained(tiny).save_pretrained(out, max_shard_size=2_000_000, extra_files=extra)
    assert len(list(out.glob("model-*.safetensors"))) > 1
    return out


@pytest.fixture
def ckpt(sharded, tmp_path):
    """A fresh copy of the sharded checkpoint to break."""
    return shutil.copytree(sharded, tmp_path / "ckpt")


def user_error(tmp_path, *overrides) -> str:
    cfg = compose_cfg("experiment=smoke", *overrides)
    with pytest.raises(USER_ERRORS) as info:
        train(cfg, tmp_path / "run")
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_a_valid_sharded_checkpoint_passes_preflight(ckpt, tmp_path):
    with pytest.raises(AssertionError, match="the model was loaded"):  # preflight passed: the loader was reached
        train(compose_cfg("experiment=smoke", f"model.path={ckpt}"), tmp_path / "run")


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("optim.lr=-1", "optim.lr=-1"),
        ("optim.lr=0", "optim.lr=0"),
        ("optim.betas=[0.9,1.0]", "optim.betas"),
        ("optim.eps=0", "optim.eps=0"),
        ("policy.groups.o_proj.r=0", "policy.groups.o_proj.r=0"),
        ("policy.groups.o_proj.alpha=0", "policy.groups.o_proj.alpha=0"),
        ("policy.groups.o_proj.dropout=1.0", "policy.groups.o_proj.dropout=1.0"),
    ],
)
def test_optimizer_and_lora_values(tmp_path, override, needle):
    message = user_error(tmp_path, "policy=lora_o_mlp", override)
    assert message.startswith("invalid config: ") and needle in message


def test_missing_data_files(tmp_path):
    assert "data.train_path=" in user_error(tmp_path, f"data.train_path={tmp_path / 'nope.jsonl'}")
    assert "data.eval_path=" in user_error(tmp_path, f"data.eval_path={tmp_path / 'nope.jsonl'}")
    assert "data.image_root=" in user_error(tmp_path, f"data.image_root={tmp_path / 'nope'}")


def test_bad_record(tmp_path):
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}\n{oops\n')
    message = user_error(tmp_path, f"data.train_path={bad}")
    assert f"{bad}:2" in message and "invalid JSON" in message


def test_resume_paths(tmp_path):
    assert "trainer.resume=" in user_error(tmp_path, f"trainer.resume={tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    assert "neither a checkpoint directory" in user_error(tmp_path, f"trainer.resume={tmp_path / 'empty'}")


def test_resume_checkpoint_of_another_layout(tmp_path):
    step = tmp_path / "old" / "checkpoints" / "step_00000003"
    step.mkdir(parents=True)
    (step / "state.json").write_text(json.dumps({"dist": "zero2", "world_size": 2}))
    from deepseek_vl2_lora.training.manifest import write_manifest

    write_manifest(step)
    message = user_error(tmp_path, f"trainer.resume={step}")
    assert "dist=zero2 with 2 rank(s)" in message


def test_corrupt_or_foreign_config_json(ckpt, tmp_path):
    (ckpt / "config.json").write_text("{not json")
    message = user_error(tmp_path, f"model.path={ckpt}")
    assert str(ckpt / "config.json") in message and "not a DeepSeek-VL2 config" in message
    (ckpt / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    assert "not a DeepSeek-VL2 config" in user_error(tmp_path, f"model.path={ckpt}")


def test_config_json_that_does_not_fit_the_weights(ckpt, tmp_path):
    config = json.loads((ckpt / "config.json").read_text())
    config["language_config"]["vocab_size"] += 8
    (ckpt / "config.json").write_text(json.dumps(config))
    message = user_error(tmp_path, f"model.path={ckpt}")
    assert "shape mismatches" in message and "embed_tokens" in message


def test_missing_and_truncated_shards(ckpt, tmp_path):
    shards = sorted(ckpt.glob("model-*.safetensors"))
    size = shards[-1].stat().st_size
    with open(shards[-1], "r+b") as f:
        f.truncate(size - 100)
    message = user_error(tmp_path, f"model.path={ckpt}")
    assert str(shards[-1]) in message and "truncated" in message
    shards[0].unlink()
    message = user_error(tmp_path, f"model.path={ckpt}")
    assert "lists shards that are not in" in message and shards[0].name in message
    (ckpt / "model.safetensors.index.json").write_text("[]")
    assert "not a valid safetensors index" in user_error(tmp_path, f"model.path={ckpt}")


def test_shard_with_a_damaged_header(ckpt, tmp_path):
    shard = sorted(ckpt.glob("model-*.safetensors"))[0]
    raw = bytearray(shard.read_bytes())
    raw[10:20] = b"\xff" * 10
    shard.write_bytes(bytes(raw))
    message = user_error(tmp_path, f"model.path={ckpt}")
    assert str(shard) in message and "safetensors header" in message


def test_header_reader_reads_keys_and_shapes(sharded):
    shapes = {}
    for shard in sorted(sharded.glob("model-*.safetensors")):
        shapes.update(read_safetensors_header(shard))
    weights = DeepseekVL2ForCausalLM.from_pretrained(sharded).state_dict()
    assert shapes["language.model.embed_tokens.weight"] == tuple(weights["language.model.embed_tokens.weight"].shape)


@pytest.mark.parametrize("name", ["processor_config.json", "tokenizer.json"])
def test_missing_processor_and_tokenizer_files(ckpt, tmp_path, name):
    (ckpt / name).unlink()
    message = user_error(tmp_path, f"model.path={ckpt}")
    assert str(ckpt) in message
