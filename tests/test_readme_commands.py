"""README.md's user-facing commands run as written: they are read from its bash blocks (so the test fails when
the README drifts from the tools), only sizes are made small, and they run in a scratch copy of the checkout's
layout (runs/, data/ and hub/ are written there, never into the checkout)."""
from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ("sample.py", "evaluate.py", "prepare_data.py")


def readme_commands() -> list[list[str]]:
    """Every command line in README.md's bash blocks, split as the shell splits it (comments dropped)."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S)
    lines = [shlex.split(line, comments=True) for block in blocks for line in block.splitlines()]
    return [argv for argv in lines if argv]


def command(*prefix: str) -> list[str]:
    """The one README command that starts with `prefix`."""
    found = [argv for argv in readme_commands() if argv[:len(prefix)] == list(prefix)]
    assert len(found) == 1, f"README.md has {len(found)} commands starting with {shlex.join(prefix)!r}: {found}"
    return found[0]


def value(argv: list[str], flag: str) -> str:
    """The value the command gives `flag` (the test fails if the README dropped the flag)."""
    assert flag in argv, f"{shlex.join(argv)} has no {flag}"
    return argv[argv.index(flag) + 1]


def substitute(argv: list[str], values: dict[str, str]) -> list[str]:
    """The command with some flags' values (or `--set` keys' values) replaced by small ones."""
    out = list(argv)
    for flag, new in values.items():
        if flag.startswith("--"):
            value(out, flag)
            out[out.index(flag) + 1] = new
        else:
            (i,) = [i for i, a in enumerate(out) if a.startswith(f"{flag}=")]
            out[i] = f"{flag}={new}"
    return out


@pytest.mark.parametrize("tool", TOOLS)
def test_a_wrong_flag_is_answered_before_torch_is_imported(tool):
    probe = ("import runpy, sys\nsys.argv = [sys.argv[1], '--no-such-flag']\ntry:\n"
             "    runpy.run_path(sys.argv[0], run_name='__main__')\nexcept SystemExit as e:\n"
             "    print(e.code, 'torch' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", probe, str(ROOT / "tools" / tool)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=120)
    assert r.stdout.split() == ["2", "False"], r.stdout + r.stderr  # argparse's exit status, torch never loaded
    assert f"{tool}: error: " in r.stderr, r.stderr


def test_the_readme_sample_command_parses():
    import importlib.util

    tool = importlib.import_module("sedd_scale.cli.sample")
    argv = command("python", "tools/sample.py")
    args = tool.parse_args(argv[2:])  # an argparse error (e.g. a required flag the README omits) exits here
    assert args.out is None and tool.summary_path(args) is None and "[BLANK" in args.template


@pytest.mark.slow
def test_the_readme_commands_run_as_written(tmp_path):
    work = tmp_path / "checkout"  # the checkout's layout; what the commands write stays here
    work.mkdir()
    for name in ("launcher.sh", "tools", "recipes", "sedd_scale"):
        (work / name).symlink_to(ROOT / name)
    env = {**os.environ, "SEDD_PYTHON": sys.executable, "SEDD_CACHE": str(tmp_path / "cache"),
           "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "2"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID"):
        env.pop(key, None)

    def run(argv: list[str]) -> subprocess.CompletedProcess:
        argv = [sys.executable if argv[0] == "python" else argv[0], *argv[1:]]
        r = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{shlex.join(argv)} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        return r

    # Data: byte tokens from local text files (one document each; every 100th is held out for validation).
    prepare = command("python", "tools/prepare_data.py", "--input")
    books = work / Path(value(prepare, "--input")).parent
    books.mkdir(parents=True)
    words = "the a cat dog sat on mat and ran far home by river with tree old new small big".split()
    for i in range(100):
        (books / f"{i:03d}.txt").write_text(" ".join(words[(i * 7 + j * j) % len(words)] for j in range(200)) + ".\n")
    run(prepare)
    manifest = Path(value(prepare, "--out")) / "manifest.json"
    assert "all shards intact" in run(substitute(command("python", "tools/prepare_data.py", "--verify"),
                                                 {"--verify": str(manifest)})).stdout

    # Layout checks start nothing and are instant.
    for argv in readme_commands():
        if argv[:3] == ["python", "-m", "sedd_scale.config"]:
            assert "layout" in run(argv).stdout.lower()

    # Two small training steps of the tiny recipe on that data, through the launcher.
    train = substitute(command("./launcher.sh", "recipes/cpu-tiny.yaml", "--set"), {"train.steps": "2"})
    out = run([*train, "--set", f"data.manifests=[{manifest}]", "parallel.micro_batch=4", "parallel.global_batch=8",
               "train.save_every=1", "train.eval_every=2", "train.eval_batches=1", "train.eval_draws=2",
               "train.sample_steps=4", "optim.warmup=1"]).stdout
    assert "step 2: validation ELBO" in out and "--- sample 0 ---" in out, out[-3000:]

    # Conversion, evaluation and sampling, chained through the paths the README gives.
    consolidate = command("python", "tools/convert_checkpoint.py", "consolidate")
    run(consolidate)
    to_hub = command("python", "tools/convert_checkpoint.py", "to-hub")
    assert to_hub[3] == consolidate[4], "to-hub converts what consolidate wrote"
    run(to_hub)
    assert (work / to_hub[4] / "config.json").is_file()

    evaluate = command("python", "tools/evaluate.py", consolidate[3])  # the training run consolidated above
    evaluate = substitute(evaluate, {"--split": "valid", "--draws": "2"})  # --input data has no test split
    run(evaluate)
    result = json.loads((work / value(evaluate, "--out")).read_text())
    assert result["step"] == 2 and result["split"] == "valid" and math.isfinite(result["nats_per_token"]), result

    sample = command("python", "tools/sample.py")
    assert sample[2] == consolidate[4], "sample.py samples what consolidate wrote"
    out = run(substitute(sample, {"--num-samples": "2", "--steps": "4"})).stdout
    for i in range(2):  # printed, since the README's command has no --out
        text = out.split(f"--- sample {i} ---\n", 1)[1]
        assert text.startswith("The ") and " and the " in text, out
