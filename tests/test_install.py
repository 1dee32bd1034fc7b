"""A non-editable install (a wheel, into a fresh venv) trains and evaluates with the console commands: the configs and
assets come from the installed package, nothing from this checkout (the demo data excepted, passed by path)."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("vl2-train", "vl2-eval", "vl2-merge", "vl2-chat", "vl2-export", "vl2-data")


def _run(cmd, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, f"{cmd}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The project built as a wheel, from a copy of the sources (no build files in the checkout)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "deepseek_vl2_lora", src / "deepseek_vl2_lora", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheels")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)])
    (found,) = out.glob("deepseek_vl2_lora-*.whl")
    return found


def test_the_wheel_ships_configs_assets_and_commands(wheel):
    import zipfile

    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {str(p.relative_to(ROOT)) for p in (ROOT / "deepseek_vl2_lora" / "configs").rglob("*") if p.is_file()}
    assert configs and configs <= names
    assert "deepseek_vl2_lora/assets/released/deepseek-vl2-tiny/config.json" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert all(f"{c} = " in text for c in COMMANDS)


@pytest.mark.slow
def test_non_editable_install_trains_and_evaluates(wheel, tmp_path, tmp_path_factory):
    """A fresh venv sees the shared venv's packages through a .pth path line (which does not run that venv's
    editable-install hook), gets the wheel with --no-deps, and runs from a directory outside the checkout."""
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "shared_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)])
    assert all((venv / "bin" / c).is_file() for c in COMMANDS)

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(
        DEEPSEEK_VL2_LORA_CACHE=str(tmp_path_factory.getbasetemp() / "tiny_cache"),  # the session's tiny models
        WANDB_MODE="disabled",
        PATH=f"{venv / 'bin'}:{env.get('PATH', '')}",
    )
    where = _run([str(python), "-c", "import deepseek_vl2_lora as p; print(p.__file__)"], cwd=work, env=env).stdout
    assert where.startswith(str(site)), where  # the installed package, not this checkout

    run = work / "run"
    demo = ROOT / "data" / "demo"
    _run(
        ["vl2-train", "experiment=smoke", f"data.train_path={demo / 'train.jsonl'}",
         f"data.eval_path={demo / 'eval.jsonl'}", f"hydra.run.dir={run}"],
        cwd=work, env=env,
    )  # fmt: skip
    assert (run / "train.log").is_file() and (run / "trained" / "adapter_config.json").is_file()
    _run(["vl2-eval", str(run)], cwd=work, env=env)
    ev = json.loads((run / "eval.json").read_text())
    after = json.loads((run / "summary.json").read_text())["eval_after"]
    assert ev["kind"] == "trained" and ev["metrics"] == pytest.approx(after, rel=1e-6)
