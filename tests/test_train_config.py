"""The Hydra config tree: every experiment composes against the schema, typos fail at compose, clear errors."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from deepseek_vl2_lora.training.config import ConfigError, TrainConfig, as_train_config, check_config
from deepseek_vl2_lora.training.dist_env import DistEnv, EngineError
from deepseek_vl2_lora.training.engine import build_engine
from deepseek_vl2_lora.training.preflight import resolve_model_dir

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "deepseek_vl2_lora" / "configs"
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
GROUPS = ("model", "data", "policy", "optim", "trainer", "logger", "dist")


def compose_cfg(*overrides, config_dir=CONFIGS):
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_experiments_exist():
    assert {"default", "vl2_tiny", "vl2_small", "vl2"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes(name):
    text = (CONFIGS / "experiment" / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_"), "experiment files are global deltas"
    cfg = compose_cfg(f"experiment={name}")
    assert OmegaConf.get_type(cfg) is TrainConfig
    assert cfg.name == name  # each experiment names its runs (run dir, W&B group)
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # every interpolation resolves
    check_config(cfg)
    assert cfg.model.path is not None or cfg.model.tiny_family is not None or cfg.model.hub_id is not None


def test_no_experiment_is_the_default_experiment():
    assert compose_cfg() == compose_cfg("experiment=default")


def test_train_yaml_has_the_groups_and_null_experiment():
    defaults = OmegaConf.load(CONFIGS / "train.yaml").defaults
    entries = {next(iter(d)): d[next(iter(d))] for d in defaults if not isinstance(d, str)}
    assert set(GROUPS) | {"hydra", "experiment"} <= set(entries)
    assert entries["experiment"] is None
    assert entries["policy"] == "mla_lowrank"


@pytest.mark.parametrize(
    "override", ["trainer.max_stpes=3", "model.attn_implementaton=sdpa", "policy.groups.o_proj.mod=lora"]
)
def test_misspelled_key_fails_at_compose(override):
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg(override)
    assert override.split("=")[0].rsplit(".", 1)[-1] in str(err.value) + str(err.value.__cause__)


def test_key_added_with_plus_is_rejected_before_training():
    cfg = compose_cfg("+trainer.max_stpes=3")  # Hydra lets `+` add keys even to a structured node
    with pytest.raises(ConfigError, match=r"trainer\.max_stpes"):
        as_train_config(cfg)
    as_train_config(compose_cfg())  # the real keys are all known


def test_wrong_type_fails_at_compose():
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg("trainer.max_steps=abc")
    assert isinstance(err.value.__cause__, ValidationError)


def test_misspelled_key_in_an_experiment_file_fails(tmp_path):
    configs = tmp_path / "configs"
    shutil.copytree(CONFIGS, configs)
    (configs / "experiment" / "typo.yaml").write_text("# @package _global_\ntrainer:\n  max_stpes: 3\n")
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg("experiment=typo", config_dir=configs)
    assert "max_stpes" in str(err.value) + str(err.value.__cause__)


def test_key_names_other_issues_use():
    cfg = compose_cfg(
        "model.path=/x",
        "model.tiny_family=null",
        "model.attn_implementation=sdpa",
        "policy=mla_lowrank_lora",
        "trainer.max_steps=7",
        "trainer.resume=auto",
    )
    assert (cfg.model.path, cfg.model.attn_implementation, cfg.trainer.max_steps) == ("/x", "sdpa", 7)
    assert cfg.trainer.resume == "auto" and cfg.policy.name == "mla_lowrank_lora"


def test_value_checks_name_the_key_and_choices():
    cfg = compose_cfg("trainer.precision=fp16", "trainer.micro_batch_size=0")
    with pytest.raises(ConfigError) as err:
        check_config(cfg)
    assert "trainer.precision='fp16'" in str(err.value) and "bf16" in str(err.value)
    assert "trainer.micro_batch_size=0" in str(err.value)


@pytest.mark.parametrize("model", ["vl2_tiny", "vl2_small", "vl2"])
def test_real_model_without_path_says_where_to_get_it(model):
    cfg = compose_cfg(f"model={model}")
    with pytest.raises(ConfigError) as err:
        resolve_model_dir(cfg.model)
    repo = {"vl2_tiny": "deepseek-vl2-tiny", "vl2_small": "deepseek-vl2-small", "vl2": "deepseek-vl2"}[model]
    assert f"https://huggingface.co/deepseek-ai/{repo}" in str(err.value)
    assert "model.path=" in str(err.value)


def test_real_model_path_without_config_json(tmp_path):
    cfg = compose_cfg("model=vl2_small", f"model.path={tmp_path}")
    with pytest.raises(ConfigError, match="no config.json"):
        resolve_model_dir(cfg.model)


def test_deepspeed_engines_fail_clearly(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # as if DeepSpeed were not installed
    cfg = compose_cfg("dist=zero2")
    with pytest.raises(EngineError, match="dist=zero2 needs DeepSpeed"):
        build_engine(cfg.dist, None, [], cfg.optim, 1, DistEnv())


def test_cli_errors_are_short(tmp_path):
    """The CLI: a typo gets Hydra's message, a missing checkpoint our message, neither a Python traceback."""
    cmd = [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={tmp_path}"]
    typo = subprocess.run([*cmd, "trainer.max_stpes=3"], capture_output=True, text=True, cwd=tmp_path)
    assert typo.returncode != 0 and "max_stpes" in typo.stderr
    missing = subprocess.run([*cmd, "experiment=vl2"], capture_output=True, text=True, cwd=tmp_path)
    assert missing.returncode == 1
    assert "huggingface.co/deepseek-ai/deepseek-vl2" in missing.stderr
    assert "Traceback" not in missing.stderr


@pytest.mark.parametrize(
    "overrides,expected",
    [
        ((), "none"),
        (("trainer.gradient_checkpointing=true",), "full"),  # the older name still works
        (("trainer.gradient_checkpointing=false",), "none"),
        (("trainer.recompute=selective",), "selective"),
        (("trainer.recompute=selective", "trainer.gradient_checkpointing=false"), "selective"),  # not full: agrees
        (("trainer.recompute=full", "trainer.gradient_checkpointing=true"), "full"),
        (("experiment=vl2_small",), "full"),
        (("experiment=vl2_small", "trainer.recompute=none"), "none"),
        # the older name, when set, wins (no shipped config sets it: it was typed)
        (("experiment=vl2_small", "trainer.gradient_checkpointing=false"), "none"),
        (("trainer.recompute=selective", "trainer.gradient_checkpointing=true"), "full"),
        (("trainer.recompute=none", "trainer.gradient_checkpointing=true"), "full"),
    ],
)
def test_recompute_and_its_older_name(overrides, expected):
    from deepseek_vl2_lora.training.config import resolve_recompute

    cfg = as_train_config(compose_cfg(*overrides))
    check_config(cfg)
    assert resolve_recompute(cfg.trainer) == expected


def test_an_unknown_recompute_setting_is_a_one_line_error():
    cfg = as_train_config(compose_cfg("trainer.recompute=some"))
    with pytest.raises(ConfigError, match="trainer.recompute") as err:
        check_config(cfg)
    assert "\n" not in str(err.value)
