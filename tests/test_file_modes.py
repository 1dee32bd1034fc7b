"""Files and directories a run writes have the modes the umask says (not tempfile's 0600/0700)."""

import os
import stat
import tempfile

import pytest
from test_train_config import compose_cfg

from deepseek_vl2_lora.model.checkpoint import honour_umask, make_temp_dir
from deepseek_vl2_lora.training import train


@pytest.fixture
def umask():
    def set_mask(mask):
        os.umask(mask)
        return mask

    old = os.umask(0o022)
    os.umask(old)
    yield set_mask
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_temp_dirs_and_files_follow_the_umask(tmp_path, umask, mask):
    umask(mask)
    assert mode(make_temp_dir(tmp_path, ".x-")) == 0o777 & ~mask
    fd, name = tempfile.mkstemp(dir=tmp_path)
    os.close(fd)
    honour_umask(name)
    assert mode(name) == 0o666 & ~mask


def test_a_run_writes_everything_as_the_umask_says(tmp_path, umask, monkeypatch):
    monkeypatch.setenv("DEEPSEEK_VL2_LORA_CACHE", str(tmp_path / "tiny_cache"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    umask(0o002)  # a team's shared directory: group-writable
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    cfg = compose_cfg("experiment=smoke", "trainer.save_every=3", f"trainer.vision_feature_cache={cache}")
    train(cfg, run_dir)
    paths = [p for root in (run_dir, cache) for p in root.rglob("*") if not p.is_symlink()]
    assert any(p.parent.name == "trained" for p in paths) and any("step_" in str(p) for p in paths)
    assert any(p.suffix == ".safetensors" for p in cache.rglob("*"))
    wrong = {str(p): oct(mode(p)) for p in paths if mode(p) != (0o775 if p.is_dir() else 0o664)}
    assert not wrong, "\n".join(f"{m} {p}" for p, m in sorted(wrong.items()))
