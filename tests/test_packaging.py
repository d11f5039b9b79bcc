"""`pip install .` gives the console scripts and the packaged recipes: `sedd-train cpu-tiny` runs from an empty
directory of a fresh venv, and every script answers --help."""
from __future__ import annotations

import os
import site
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv holding a built (not editable) install of this checkout; the dependencies come from the test's
    own environment through a .pth file, so nothing is downloaded or built but the project itself."""
    venv = tmp_path_factory.mktemp("venv") / "v"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    purelib = Path(subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    deps = [p for p in {*site.getsitepackages(), sysconfig.get_paths()["purelib"]} if Path(p).is_dir()]
    (purelib / "deps.pth").write_text("\n".join(deps) + "\n")
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": os.devnull}
    done = subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(ROOT)],
                          capture_output=True, text=True, env=env, cwd=venv)
    assert done.returncode == 0, done.stderr[-2000:]
    return venv


def _clean_env(venv: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                          "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "PATH": f"{venv / 'bin'}:{env['PATH']}", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@pytest.mark.slow
def test_the_installed_package_is_not_this_checkout(installed, tmp_path):
    done = subprocess.run([installed / "bin" / "python", "-c", "import sedd_scale; print(sedd_scale.__file__)"],
                          capture_output=True, text=True, env=_clean_env(installed), cwd=tmp_path, check=True)
    assert str(installed) in done.stdout and str(ROOT) not in done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_console_script_answers_help(installed, script, tmp_path):
    done = subprocess.run([installed / "bin" / script, "--help"], capture_output=True, text=True,
                          env=_clean_env(installed), cwd=tmp_path)
    assert done.returncode == 0 and "usage" in done.stdout.lower(), done.stderr[-2000:]


@pytest.mark.slow
def test_sedd_train_runs_a_packaged_recipe_from_an_empty_directory(installed, tmp_path):
    done = subprocess.run([installed / "bin" / "sedd-train", "cpu-tiny", "--set", "train.steps=2",
                           "train.eval_every=2", "train.save_every=2", "train.eval_batches=1", "train.sample_steps=4"],
                          capture_output=True, text=True, env=_clean_env(installed), cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert (tmp_path / "runs" / "cpu-tiny" / "latest").is_file()
    assert "validation ELBO" in done.stdout + done.stderr
