"""`pip install .` gives the console scripts and the packaged recipes: `sedd-train cpu-tiny` runs from an empty
directory of a fresh venv, and every script answers --help."""
from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
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
    source = venv.parent / "source"  # setuptools builds in the source tree (build/, *.egg-info): a copy's
    top = {".git", "runs", "data", "build", ".pytest_cache", ".whl"}  # the checkout's own outputs, not the package's

    def ignore(folder: str, names: list[str]) -> set[str]:
        here = {n for n in names if n.startswith(".venv") or n.endswith(".egg-info") or n == "__pycache__"}
        return here | (top & set(names) if Path(folder) == ROOT else set())

    shutil.copytree(ROOT, source, ignore=ignore)
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": os.devnull}
    done = subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(source)],
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


def walkthrough() -> list[list[str]]:
    """The commands of the README's "Train on your own data" block, split as the shell splits them."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Train on your own data", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


@pytest.mark.slow
def test_the_readme_walkthrough_runs_as_written(installed, tmp_path):
    """Own text -> prepare -> own recipe -> train -> consolidate -> sample -> evaluate, with the installed scripts in an
    empty directory; only the run is made short (extra --set keys on the recipe line)."""
    commands = walkthrough()
    assert [c[0] for c in commands] == ["sedd-prepare", "sedd-plan", "sedd-train", "sedd-convert", "sedd-sample",
                                        "sedd-evaluate"]
    words = "the a cat dog sat on mat and ran far home by river with tree old new small big".split()
    (tmp_path / "my-text").mkdir()
    for i in range(100):
        (tmp_path / "my-text" / f"{i:03d}.txt").write_text(
            " ".join(words[(i * 7 + j * j) % len(words)] for j in range(200)) + ".\n")
    short = ["train.steps=2", "train.eval_every=2", "train.save_every=2", "train.eval_batches=1",
             "train.sample_steps=4", "parallel.micro_batch=4", "parallel.global_batch=8", "optim.warmup=1",
             "data.num_workers=0"]
    for argv in commands:
        if argv[0] == "sedd-plan":
            argv = argv[:argv.index("--save-recipe")] + short + argv[argv.index("--save-recipe"):]
        done = subprocess.run([installed / "bin" / argv[0], *argv[1:]], capture_output=True, text=True,
                              env=_clean_env(installed), cwd=tmp_path, timeout=600)
        assert done.returncode == 0, f"{shlex.join(argv)}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        if argv[0] == "sedd-sample":
            assert "--- sample 0 ---\nThe " in done.stdout, done.stdout[-2000:]
    export = tmp_path / "runs" / "mine-ema"
    assert {"tokenizer_config.json", "README.md", "SHA256SUMS"} <= {p.name for p in export.iterdir()}
    result = json.loads((export / "valid.json").read_text())
    assert result["step"] == 2 and math.isfinite(result["nats_per_token"])
