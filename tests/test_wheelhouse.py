"""The offline install kit: tools/wheelhouse.py builds a folder of wheels (from the package index, once), and
tools/bootstrap.sh with SEDD_WHEELHOUSE installs the project from that folder alone, with the network refused: a
fresh venv (torch from the folder), then an existing interpreter whose torch must stay as it is."""
from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLOSED = "http://127.0.0.1:9"  # the discard port: nothing listens, so any request through the proxy fails at once
# bootstrap.sh itself imports torch, sedd_scale.compat, megatron.core and DeepSpeed (and webdataset, yaml,
# safetensors and tiktoken with SEDD_PYTHON) or fails; this asks the installed set without importing torch again.
PROBE = ("import importlib.metadata as m, importlib.util as u, webdataset, tokenizers, tensorboard;"
         "print(m.version('torch'), m.version('deepspeed'), u.find_spec('sedd_scale.compat').origin)")


def offline_env() -> dict[str, str]:
    """This environment with every way to an index closed: no index, no pip config (it adds find-links and
    indexes here), no PIP_* variable, proxies pointing at a closed port; no PYTHONPATH to the checkout either."""
    drop = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "pythonpath")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k.lower() not in drop}
    env.update(PIP_NO_INDEX="1", PIP_CONFIG_FILE=os.devnull, PYTHONWARNINGS="ignore",
               http_proxy=CLOSED, https_proxy=CLOSED, HTTP_PROXY=CLOSED, HTTPS_PROXY=CLOSED, ALL_PROXY=CLOSED)
    return env


def bootstrap(**settings: str) -> subprocess.CompletedProcess:
    """tools/bootstrap.sh, offline, with these settings."""
    return subprocess.run(["bash", str(ROOT / "tools" / "bootstrap.sh")], env={**offline_env(), **settings},
                          capture_output=True, text=True, timeout=900)


def probe(python: str) -> list[str]:
    """torch's and DeepSpeed's installed versions and where that interpreter finds sedd_scale.compat."""
    r = subprocess.run([python, "-c", PROBE], env=offline_env(), capture_output=True, text=True, timeout=300,
                       cwd="/")
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.split()


@pytest.mark.slow
def test_the_project_installs_from_a_wheelhouse_with_the_network_refused(tmp_path):
    python = "%d.%d" % sys.version_info[:2]
    torch = importlib.metadata.version("torch")  # this machine's local CPU wheel, found through its pip config
    house = tmp_path / "wheels"
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "wheelhouse.py"), "--python", python, "--out", str(house),
                        "--torch", f"torch=={torch}"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    wheels = {re.sub(r"[-_.]+", "-", w.name.split("-")[0]).lower(): w.name for w in house.glob("*.whl")}
    pinned = [line for line in (house / "requirements.txt").read_text().splitlines() if not line.startswith("#")]
    assert len(pinned) == len(wheels) == len(list(house.glob("*.whl")))  # one version of each, all listed
    assert f"torch=={torch}" in pinned and f"# python {python}" in (house / "requirements.txt").read_text()
    assert wheels["deepspeed"].endswith("-py3-none-any.whl")  # built here without its C++ ops
    assert {"megatron-core", "webdataset", "hjson", "braceexpand", "setuptools"} <= wheels.keys()
    assert not [n for n in wheels if n.startswith(("nvidia", "triton"))]
    mib = float(re.search(r"(\d+\.\d) MiB, limit 60 MiB", r.stdout).group(1))
    assert 5 < mib <= 60, r.stdout

    # A fresh venv from the wheelhouse alone: torch and everything else.
    venv = tmp_path / "venv"
    settings = {"SEDD_WHEELHOUSE": str(house), "SEDD_VENV": str(venv), "PYTHON": sys._base_executable}
    r = bootstrap(**settings)
    assert r.returncode == 0, r.stderr[-5000:]
    assert r.stdout.strip() == str(venv / "bin" / "python")
    version, deepspeed, compat = probe(r.stdout.strip())
    assert version == torch and wheels["deepspeed"].startswith(f"deepspeed-{deepspeed}-")
    assert Path(compat).is_relative_to(ROOT)  # the editable install of this checkout
    again = bootstrap(**settings)
    assert again.returncode == 0 and "installing" not in again.stderr, again.stderr  # the stamp: a no-op

    # An existing interpreter with its own torch (here the venv above, a few packages removed): what it lacks is
    # installed, its torch is left alone.
    vpy = str(venv / "bin" / "python")
    gone = ["deepspeed", "webdataset", "braceexpand", "hjson"]
    r = subprocess.run([vpy, "-m", "pip", "uninstall", "-y", *gone], env=offline_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    where = "import importlib.util as u; print(u.find_spec('torch').origin)"
    torch_file = Path(subprocess.check_output([vpy, "-c", where], env=offline_env(), text=True).strip())
    before = torch_file.stat()
    r = bootstrap(SEDD_PYTHON=vpy, SEDD_WHEELHOUSE=str(house))
    assert r.returncode == 0, r.stderr[-5000:]
    assert r.stdout.strip() == vpy and f"torch {torch} kept" in r.stderr
    assert probe(vpy)[:2] == [torch, deepspeed]
    after = torch_file.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # torch not reinstalled
    # The next run skips pip (running it to show that would import everything once more: 20 s).
    assert (torch_file.parents[1] / ".sedd-scale-bootstrap.stamp").is_file()
