"""launcher.sh: single process, torchrun, and slurm (simulated: SLURM_* variables plus stand-in
`srun` / `scontrol` on PATH that start local processes), and refusals before anything starts.

The launcher runs from a copy whose tools/bootstrap.sh is a stand-in printing this interpreter,
so a test never rebuilds the real virtual environment.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "recipes" / "cpu-tiny.yaml")
# A world of one has no master (an in-memory store): "master none:none". These layouts run CP 1: cp rank 0.
RANK_LINE = re.compile(r"rank (\d+)/(\d+) local (\d+) master (\S+):(\d+|none) \| tp (\d+) cp 0 pp (\d+) dp (\d+)")

FAKE_SRUN = """\
#!{python}
# Stand-in for slurm's srun: starts --ntasks local processes with slurm's per-task variables.
# Options must be written --key=value (as launcher.sh does). FAKE_SRUN_DRY=1: record only.
import os, subprocess, sys
args, opts = sys.argv[1:], {{}}
while args and args[0].startswith("-"):
    key, _, value = args.pop(0).partition("=")
    opts[key] = value
with open(os.environ["FAKE_SLURM_LOG"], "a") as log:
    log.write("srun " + " ".join(f"{{k}}={{v}}" for k, v in opts.items()) + "\\n")
if os.environ.get("FAKE_SRUN_DRY"):
    sys.exit(0)
ntasks = int(opts.get("--ntasks") or os.environ["SLURM_NTASKS"])
per_node = int(opts.get("--ntasks-per-node") or ntasks // int(os.environ["SLURM_JOB_NUM_NODES"]))
procs = [subprocess.Popen(args, env=dict(os.environ, SLURM_PROCID=str(i), SLURM_LOCALID=str(i % per_node),
                                         SLURM_NODEID=str(i // per_node), SLURM_NTASKS=str(ntasks), SLURM_STEP_ID="0"))
         for i in range(ntasks)]
sys.exit(max(p.wait() for p in procs))
"""

FAKE_SCONTROL = """\
#!{python}
# Stand-in for `scontrol show hostnames LIST`: one host per comma-separated item.
import os, sys
with open(os.environ["FAKE_SLURM_LOG"], "a") as log:
    log.write("scontrol " + " ".join(sys.argv[1:]) + "\\n")
assert sys.argv[1:3] == ["show", "hostnames"], sys.argv
print("\\n".join(sys.argv[3].split(",")))
"""

FAKE_BOOTSTRAP = """\
#!/usr/bin/env bash
echo "[bootstrap] stand-in: using {python}" >&2
touch "$(dirname "$0")/../bootstrap-ran"
echo "{python}"
"""


@pytest.fixture
def sandbox(tmp_path):
    """A launcher copy with a stand-in bootstrap, stand-in slurm tools, and a clean environment."""
    root = tmp_path / "repo"
    (root / "tools").mkdir(parents=True)
    shutil.copy(REPO / "launcher.sh", root / "launcher.sh")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for path, text in [(root / "tools" / "bootstrap.sh", FAKE_BOOTSTRAP), (bin_dir / "srun", FAKE_SRUN),
                       (bin_dir / "scontrol", FAKE_SCONTROL)]:
        path.write_text(textwrap.dedent(text).format(python=sys.executable))
        path.chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                       "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE_SLURM_LOG=str(tmp_path / "slurm.log"), PYTHONWARNINGS="ignore",
               OMP_NUM_THREADS="1")
    return root, env, tmp_path / "slurm.log"


def run(sandbox, *args, env=None, timeout=300):
    """Run the sandboxed launcher; returns the completed process (text)."""
    root, base, _ = sandbox
    return subprocess.run([str(root / "launcher.sh"), *args], env={**base, **(env or {})}, cwd=root,
                          capture_output=True, text=True, timeout=timeout)


def rank_lines(out: str) -> list[tuple]:
    """(rank, world, local, master, port, tp, pp, dp) for every rank line, sorted by rank."""
    return sorted((int(m[1]), int(m[2]), int(m[3]), m[4], None if m[5] == "none" else int(m[5]), int(m[6]),
                   int(m[7]), int(m[8]))
                  for m in RANK_LINE.finditer(out))


SLURM_ENV = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS": "4",
             "SLURM_JOB_NODELIST": "localhost,node-b"}


def slurm_port(job_id: str) -> int:
    """launcher.sh's MASTER_PORT for a slurm job: 20000 + (first 32 bits of sha256(job id)) mod 12768."""
    import hashlib

    return 20000 + int(hashlib.sha256(job_id.encode()).hexdigest()[:8], 16) % 12768


def test_help(sandbox):
    """--help prints the usage."""
    p = run(sandbox, "--help")
    assert p.returncode == 0 and "--nproc N" in p.stdout and "--set k=v" in p.stdout


@pytest.mark.parametrize("args, message", [
    (["--nproc", "2", "--set", "parallel.pp=2", "parallel.zero_stage=2"], "supports ZeRO-1 only"),
    (["--nproc", "3", "--set", "parallel.tp=2"], "world size 3 is not divisible by tp*pp"),
    (["--set", "parallel.tp=3"], "tensor-parallel size 3 does not divide n_heads=4"),
    (["--set", "optim.lrr=1"], "did you mean 'optim.lr'"),
    (["--nproc", "0"], "--nproc must be a positive integer"),
    (["--set", "lr"], "--set needs key=value"),
])
def test_refused_before_launch(sandbox, args, message):
    """Impossible recipes and layouts stop the launcher with the reason; no process is started."""
    p = run(sandbox, TINY, *args)
    assert p.returncode == 2, p.stdout + p.stderr
    assert message in p.stderr
    assert "launcher: torchrun" not in p.stdout and "rank 0/" not in p.stdout


def test_slurm_refusal_starts_no_task(sandbox):
    """In slurm mode an impossible layout (4 tasks, TP=3) is refused before srun is called."""
    p = run(sandbox, TINY, "--set", "parallel.tp=3", "parallel.pp=1", env=SLURM_ENV)
    assert p.returncode == 2 and "does not divide" in p.stderr
    assert not sandbox[2].exists() or "srun" not in sandbox[2].read_text()
    assert (sandbox[0] / "bootstrap-ran").exists()


def test_slurm_nproc_sets_tasks_per_node(sandbox):
    """With --nproc inside an allocation, srun gets nodes x nproc tasks, nproc per node."""
    p = run(sandbox, TINY, "--nproc", "2", "--set", "parallel.micro_batch=8",
            env={**SLURM_ENV, "SLURM_NTASKS": "", "FAKE_SRUN_DRY": "1"})
    assert p.returncode == 0, p.stderr
    log = sandbox[2].read_text()
    assert "scontrol show hostnames localhost,node-b" in log
    assert "--nodes=2 --ntasks=4 --ntasks-per-node=2" in log
    assert "layout: world 4 = TP 1 x PP 1 x DP 4 | ZeRO-0 | batch 32 = micro 8 x DP 4 x grad accum 1" in p.stdout
    assert f"launcher: master localhost:{slurm_port('4242')}" in p.stdout


@pytest.mark.slow
def test_single_process(sandbox):
    """--nproc 1 (the default) runs one process that forms a world of one."""
    p = run(sandbox, TINY, "--layout-only")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "launcher: single process" in p.stdout
    layout = "layout: world 1 = TP 1 x PP 1 x DP 1 | ZeRO-0 | batch 32 = micro 16 x DP 1 x grad accum 2"
    assert p.stdout.count(layout) == 2
    assert [r[:3] for r in rank_lines(p.stdout)] == [(0, 1, 0)]


@pytest.mark.slow
def test_torchrun_two_processes(sandbox):
    """--nproc 2 starts torchrun; two ranks form TP=2 with the layout printed."""
    p = run(sandbox, TINY, "--nproc", "2", "--set", "parallel.tp=2", "--layout-only")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "launcher: torchrun: 2 processes on this node" in p.stdout
    assert "layout: world 2 = TP 2 x PP 1 x DP 1 | ZeRO-0 | batch 32 = micro 16 x DP 1 x grad accum 2" in p.stdout
    ranks = rank_lines(p.stdout)
    assert [(r[0], r[1], r[2], r[5], r[6], r[7]) for r in ranks] == [(0, 2, 0, 0, 0, 0), (1, 2, 1, 1, 0, 0)]


@pytest.mark.slow
def test_slurm_two_nodes(sandbox):
    """Inside a (simulated) 2-node allocation of 4 tasks: srun starts 4 ranks, TP=2 x PP=2, master = first host."""
    p = run(sandbox, TINY, "--set", "parallel.tp=2", "parallel.pp=2", "--layout-only", env=SLURM_ENV)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "launcher: slurm: 2 node(s), srun 4 tasks" in p.stdout
    assert "layout: world 4 = TP 2 x PP 2 x DP 1 | ZeRO-0 | batch 32 = micro 16 x DP 1 x grad accum 2" in p.stdout
    ranks = rank_lines(p.stdout)
    # (rank, world, local rank, master, port, tp, pp, dp): megatron/DeepSpeed order rank = tp + 2 * pp
    assert ranks == [(r, 4, r % 2, "localhost", slurm_port("4242"), r % 2, r // 2, 0) for r in range(4)], ranks
    assert "srun --kill-on-bad-exit=1 --ntasks=4" in sandbox[2].read_text()


def sbatch(sandbox, env: dict, *args) -> subprocess.CompletedProcess:
    """tools/slurm.sbatch run by bash as slurm would (SLURM_* faked, stand-in srun recording only)."""
    root, base, _ = sandbox
    shutil.copy(REPO / "tools" / "slurm.sbatch", root / "tools" / "slurm.sbatch")
    return subprocess.run(["bash", str(root / "tools" / "slurm.sbatch"), TINY, *args], cwd=root, timeout=300,
                          env={**base, "SLURM_SUBMIT_DIR": str(root), "FAKE_SRUN_DRY": "1", **env},
                          capture_output=True, text=True)


SBATCH_ENV = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "1", "SLURM_NTASKS": "1",
              "SLURM_JOB_NODELIST": "localhost"}


@pytest.mark.parametrize("missing", ["SLURM_JOB_NODELIST", "SLURM_NTASKS", "SLURM_JOB_ID"])
def test_sbatch_without_a_slurm_variable_names_it(sandbox, missing):
    """A variable slurm should have set is missing: one line naming it (not bash's `unbound variable`), no srun."""
    env = {k: v for k, v in SBATCH_ENV.items() if k != missing}
    p = sbatch(sandbox, env)
    assert p.returncode == 2, p.stdout + p.stderr
    assert f"{missing} is not set" in p.stderr and "unbound variable" not in p.stderr, p.stderr
    assert not sandbox[2].exists() or "srun" not in sandbox[2].read_text()


def test_sbatch_master_port_comes_from_a_hash_of_the_whole_job_id(sandbox):
    """Any job id works (an array task's 4242_7 included), ids 20000 apart get different ports, all in 20000-32767."""
    ports = {}
    for job in ("4242", "24242", "44242", "4242_7"):
        p = sbatch(sandbox, {**SBATCH_ENV, "SLURM_JOB_ID": job})
        assert p.returncode == 0 and "unbound variable" not in p.stderr, p.stdout + p.stderr
        ports[job] = int(re.search(r"launcher: master localhost:(\d+)", p.stdout)[1])
    assert ports == {job: slurm_port(job) for job in ports}, ports
    assert len(set(ports.values())) == 4 and all(20000 <= port <= 32767 for port in ports.values()), ports
    p = sbatch(sandbox, {**SBATCH_ENV, "MASTER_PORT": "29500"})  # an explicit port is used as given
    assert p.returncode == 0 and "launcher: master localhost:29500" in p.stdout, p.stdout + p.stderr
    p = sbatch(sandbox, {**SBATCH_ENV, "MASTER_PORT": "port"})
    assert p.returncode == 2 and "MASTER_PORT must be a port number (1-65535), got 'port'" in p.stderr, p.stderr


PROBE_TOOL = """\
import os, sys
print(f"probe rank {os.environ.get('RANK')}/{os.environ.get('WORLD_SIZE')} args {sys.argv[1:]}")
"""


def test_tool_runs_on_every_rank_with_its_own_arguments(sandbox):
    """--tool NAME runs tools/NAME.py (no recipe pre-flight) on one process, torchrun ranks, or slurm tasks."""
    root = sandbox[0]
    (root / "tools" / "probe.py").write_text(PROBE_TOOL)
    p = run(sandbox, "--tool", "probe", "ckpt", "--split", "test")
    assert p.returncode == 0, p.stderr
    assert "launcher: single process (tools/probe.py)" in p.stdout
    assert "probe rank None/None args ['ckpt', '--split', 'test']" in p.stdout  # a world of one: no launcher vars
    p = run(sandbox, "--nproc", "2", "--tool", "probe", "x")
    assert p.returncode == 0, p.stderr
    assert sorted(re.findall(r"probe rank (\d)/2 args \['x'\]", p.stdout)) == ["0", "1"]
    p = run(sandbox, "--tool", "probe", "--nproc", "9", env=SLURM_ENV)  # after NAME everything is the tool's
    assert p.returncode == 0, p.stderr
    assert sorted(re.findall(r"probe rank (\d)/4 args \['--nproc', '9'\]", p.stdout)) == ["0", "1", "2", "3"]
    for args, message in (((TINY, "--tool", "probe"), "takes no recipe"), (("--tool", "nope"), "unknown tool"),
                          (("--tool",), "needs a name")):
        p = run(sandbox, *args)
        assert p.returncode == 2 and message in p.stderr, (args, p.stderr)


def _tiny_run(root: Path, steps: int = 100_000) -> str:
    """A tiny recipe on tiny synthetic data inside the sandbox (a long run, to be stopped by a signal)."""
    import numpy as np
    import yaml

    from sedd_scale.data.manifest import TokenizerInfo
    from sedd_scale.data.prepare import write_sequences

    rng = np.random.default_rng(0)
    write_sequences(root / "data", {"train": rng.integers(0, 11, (256, 8)), "valid": rng.integers(0, 11, (8, 8))},
                    TokenizerInfo("tiny", 11, 10), seqs_per_sample=8, seqs_per_shard=64)
    recipe = {"model": {"hidden_size": 32, "n_heads": 4, "n_blocks": 2, "cond_dim": 16, "num_tokens": 11,
                        "length": 8, "vocab_multiple": 1, "dropout": 0.0},
              "data": {"manifests": [str(root / "data" / "manifest.json")], "tokenizer": None, "seq_len": 8,
                       "num_workers": 0},
              "parallel": {"micro_batch": 2, "global_batch": 4, "zero_stage": 0},
              "train": {"steps": steps, "log_every": 1, "save_every": 100_000, "eval_every": 100_000,
                        "eval_batches": 1, "eval_draws": 2, "sample_steps": 2},
              "checkpoint": {"dir": str(root / "run")}}
    (root / "tiny.yaml").write_text(yaml.safe_dump(recipe))
    return str(root / "tiny.yaml")


def _stop_when_training(proc: subprocess.Popen, root: Path, send) -> tuple[int, str, str]:
    """Wait until a few steps are logged, call `send()`, and return (exit code, stdout, stderr)."""
    import time

    metrics = root / "run" / "tensorboard" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        # the quote and colon: not the per-noise-band keys ("train/loss_per_token_t0.0-0.2", ...)
        if metrics.exists() and metrics.read_text().count('"train/loss_per_token":') >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    send()
    out, err = proc.communicate(timeout=240)
    return proc.returncode, out, err


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["torchrun", "slurm"])
def test_sigterm_checkpoints_and_exits_143(sandbox, mode):
    """A pre-emption signal to the launcher (torchrun) or to every task (slurm) ends in a checkpoint and 143."""
    import signal

    root, env, _ = sandbox
    recipe = _tiny_run(root)
    slurm = {**SLURM_ENV, "SLURM_JOB_NUM_NODES": "1", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "localhost"}
    proc = subprocess.Popen([str(root / "launcher.sh"), recipe, "--nproc", "2"], cwd=root, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**env, **(slurm if mode == "slurm" else {})})

    def send():
        if mode == "torchrun":
            proc.send_signal(signal.SIGTERM)  # e.g. `kill`, or a scheduler that signals the job's main process
        else:  # slurm signals the tasks of the step; here they are the stand-in srun's children
            for pid in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split():
                os.kill(int(pid), signal.SIGTERM)

    code, out, err = _stop_when_training(proc, root, send)
    assert code == 143, out + err
    assert re.search(r"SIGTERM at step (\d+): checkpoint \S+step_\d+ written in [\d.]+ s", out + err), out + err
    if mode == "torchrun":
        assert "launcher: stopped by SIGTERM after the workers' checkpoint; exit 143" in err
        assert "Traceback" not in err and "SignalException" not in err, err
    step = int((root / "run" / "latest").read_text().removeprefix("step_"))
    assert step >= 3 and (root / "run" / f"step_{step:09d}" / "meta.json").is_file()


def _living(pid: int) -> str | None:
    """The start time of process `pid` (with the pid, an identity that survives pid reuse); None once it has
    exited (a zombie waiting for its parent has exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, ..., starttime (22nd)
    return None if fields[0] in "ZX" else fields[19]


def _descendants(pid: int) -> dict[int, str]:
    """{pid: start time} of every living descendant of `pid`."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except (FileNotFoundError, ProcessLookupError):
                continue
            children.setdefault(int(stat[stat.rindex(")") + 2:].split()[1]), []).append(int(entry.name))
    found, todo = {}, list(children.get(pid, []))
    while todo:
        child = todo.pop()
        start = _living(child)
        if start is not None:
            found[child] = start
            todo += children.get(child, [])
    return found


@pytest.mark.slow
def test_kill_9_of_the_launcher_takes_torchrun_and_its_workers_with_it(sandbox, tmp_path):
    """SIGKILL cannot be trapped: torchrun must still not outlive the launcher, nor its workers, nor the run lock."""
    import signal
    import time

    from sedd_scale.checkpoint.run_lock import RunDirBusy, RunLock

    root, env, _ = sandbox
    recipe = _tiny_run(root)
    with open(tmp_path / "out.log", "w") as out, open(tmp_path / "err.log", "w") as err:  # files: no pipe to fill
        proc = subprocess.Popen([str(root / "launcher.sh"), recipe, "--nproc", "2"], cwd=root, env=env, text=True,
                                stdout=out, stderr=err)
    family: dict[int, str] = {}
    try:
        metrics = root / "run" / "tensorboard" / "metrics.jsonl"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.exists() and metrics.read_text().count('"train/loss_per_token":') >= 2:
                break
            time.sleep(0.2)
        family = _descendants(proc.pid)
        logs = lambda: (tmp_path / "out.log").read_text() + (tmp_path / "err.log").read_text()  # noqa: E731
        assert proc.poll() is None and len(family) >= 3, (family, logs())  # torchrun and two workers
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
        deadline = time.monotonic() + 90  # torchrun's grace for its workers is 30 s; a tiny checkpoint takes less
        left = family
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = {pid: start for pid, start in family.items() if _living(pid) == start}
        assert not left, (f"still running after the launcher's SIGKILL: {left}", logs())
        try:
            RunLock(root / "run").acquire().release()
        except RunDirBusy as e:
            pytest.fail(f"the run lock outlived the launcher: {e}")
    finally:  # whatever the outcome, nothing this test started keeps running
        for pid, start in family.items():
            if _living(pid) == start:
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_two_nodes_without_slurm_meet_at_a_rendezvous(sandbox):
    """--nnodes 2 --node-rank R --rdzv HOST:PORT: two "nodes" (launchers) on this machine over loopback form one
    world."""
    from sedd_scale.distributed.parallel import free_port

    root, env, _ = sandbox
    rdzv = f"127.0.0.1:{free_port()}"
    nodes = [subprocess.Popen([str(root / "launcher.sh"), TINY, "--nnodes", "2", "--node-rank", str(r), "--rdzv", rdzv,
                               "--nproc", "1", "--layout-only"], cwd=root, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in (0, 1)]
    outs = [p.communicate(timeout=300) for p in nodes]
    for p, (out, err) in zip(nodes, outs):
        assert p.returncode == 0, out + err
    out = "".join(o for o, _ in outs)
    assert "launcher: torchrun: node 0 of 2, 1 process(es) each, rendezvous " + rdzv in out
    assert "layout: world 2 = TP 1 x PP 1 x DP 2" in out
    assert sorted(r[:2] for r in rank_lines(out)) == [(0, 2), (1, 2)]


@pytest.mark.parametrize("args, message", [
    (["--nnodes", "2", "--rdzv", "h:1"], "need --nnodes N --node-rank R --rdzv HOST:PORT together"),
    (["--nnodes", "2", "--node-rank", "2", "--rdzv", "h:1"], "--node-rank 2 is not below --nnodes 2"),
    (["--nnodes", "2", "--node-rank", "0", "--rdzv", "nohostport"], "together"),
])
def test_bad_multi_node_flags(sandbox, args, message):
    p = run(sandbox, TINY, *args)
    assert p.returncode == 2 and message in p.stderr, p.stderr


@pytest.mark.slow
def test_sedd_python_uses_the_given_interpreter_without_a_venv(sandbox):
    """SEDD_PYTHON: the real bootstrap checks that interpreter's imports and builds nothing."""
    root, env, _ = sandbox
    shutil.copy(REPO / "tools" / "bootstrap.sh", root / "tools" / "bootstrap.sh")
    p = run(sandbox, TINY, "--layout-only", env={"SEDD_PYTHON": sys.executable})
    assert p.returncode == 0, p.stdout + p.stderr
    assert not (root / ".venv").exists() and "layout: world 1" in p.stdout
    p = run(sandbox, TINY, env={"SEDD_PYTHON": "/bin/false"})
    assert p.returncode == 2 and "cannot import what sedd-scale needs" in p.stderr, p.stderr
