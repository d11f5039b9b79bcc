"""Run safety: a resume applies or refuses recipe changes key by key, a non-finite streak rolls `latest` back,
the run directory is locked, nothing is overwritten without a flag, and bad input gets one clear line."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from sedd_scale.checkpoint.run_lock import RunDirBusy, RunLock
from sedd_scale.checkpoint.sharded import FORMAT, CheckpointDir, step_name
from sedd_scale.config import Recipe, RecipeError, from_dict, load_recipe, to_dict
from sedd_scale.config.changes import APPLIED, LAYOUT, REFUSED, ResumeRefused, check_resume, flatten
from sedd_scale.train import run_dir
from sedd_scale.train.metrics import Metrics
from tests.dist import launch

REPO = Path(__file__).resolve().parents[1]


def tiny_recipe(data: Path, run: Path, **sections) -> dict:
    """A recipe of a tiny model on `data` (11 tokens, length 8) writing to `run`."""
    raw = {"model": {"hidden_size": 32, "n_heads": 4, "n_blocks": 2, "cond_dim": 16, "num_tokens": 11, "length": 8,
                     "vocab_multiple": 1, "dropout": 0.0},
           "data": {"manifests": [str(data / "manifest.json")], "tokenizer": None, "seq_len": 8, "num_workers": 0},
           "optim": {"lr": 1e-2, "warmup": 1},
           "parallel": {"micro_batch": 2, "global_batch": 4, "zero_stage": 0},
           "train": {"steps": 3, "ema": 0.9, "save_every": 1, "eval_every": 1000, "log_every": 1, "keep_last": 3,
                     "eval_batches": 1, "eval_draws": 2, "sample_steps": 2},
           "checkpoint": {"dir": str(run)}}
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return raw


def write_recipe(path: Path, raw: dict) -> str:
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _main(argv: list[str]) -> tuple[int, str]:
    """sedd_scale.train.main in this (spawned) process, with its output."""
    from sedd_scale.train import main as train

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = train.main(argv)
    return code, out.getvalue()


def train_main(*argv: str) -> tuple[int, str]:
    """One training run in a fresh process (a world of one)."""
    return launch(_main, 1, list(argv), timeout=600)[0]


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "tensorboard" / "metrics.jsonl").read_text().splitlines()]


# --- recipe changes on resume ---------------------------------------------------------------------
def test_every_recipe_key_is_classified():
    """A new recipe key must say whether a resume may change it (recipe_changes.py)."""
    keys = set(flatten(to_dict(from_dict(Recipe, tiny_recipe(Path("d"), Path("r"))))))
    tables = set(APPLIED) | set(REFUSED) | set(LAYOUT)
    assert keys - tables == set(), f"unclassified recipe keys: {sorted(keys - tables)}"
    assert not (set(APPLIED) & set(REFUSED)) and tables - keys == set(), sorted(tables - keys)


def fake_checkpoint(run: Path, raw: dict, step: int = 3, layout: dict | None = None) -> None:
    """A run directory whose latest checkpoint was written by `raw` (only meta.json: what the pre-flight reads)."""
    folder = run / step_name(step)
    folder.mkdir(parents=True)
    meta = {"format": FORMAT, "step": step, "recipe": to_dict(from_dict(Recipe, raw)), "files": {},
            "layout": layout or {"tp": 1, "pp": 1, "dp": 1, "zero_stage": 0}}
    (folder / "meta.json").write_text(json.dumps(meta))
    (run / "latest").write_text(folder.name)


def test_resume_applies_optimizer_changes_and_refuses_what_changes_the_run(tmp_path):
    raw = tiny_recipe(tmp_path / "d", tmp_path / "run")
    fake_checkpoint(tmp_path / "run", raw)
    changed = tiny_recipe(tmp_path / "d", tmp_path / "run", optim={"lr": 3e-5, "schedule": "cosine"},
                          train={"steps": 10, "ema": 0.99}, parallel={"micro_batch": 1})
    applied = run_dir.check_start(from_dict(Recipe, changed), 1).changes
    assert [c.describe() for c in applied] == [
        "optim.lr: saved 0.01, now 3e-05", "optim.schedule: saved 'constant', now 'cosine'",
        "parallel.micro_batch: saved 2, now 1", "train.ema: saved 0.9, now 0.99", "train.steps: saved 3, now 10"]
    bad = tiny_recipe(tmp_path / "d", tmp_path / "run", model={"hidden_size": 64}, diffusion={"noise": "geometric"},
                      train={"seed": 1}, optim={"lr": 1e-3})
    with pytest.raises(ResumeRefused) as e:
        run_dir.check_start(from_dict(Recipe, bad), 1)
    message = str(e.value)
    for line in ("model.hidden_size: saved 32, now 64 (changes the model)",
                 "diffusion.noise: saved 'loglinear', now 'geometric' (changes the noise process)",
                 "train.seed: saved 0, now 1 (changes the data stream and the noise of every step)",
                 "a new checkpoint.dir", "convert_checkpoint.py shard WEIGHTS NEW_DIR --recipe"):
        assert line in message, message
    assert "optim.lr" not in message  # an applicable change is not listed among the refused ones
    with pytest.raises(ResumeRefused, match=r"(?s)layout dp: saved 1, now 2.*reshard .* --dp 2"):
        run_dir.check_start(from_dict(Recipe, tiny_recipe(tmp_path / "d", tmp_path / "run")), 2)
    with pytest.raises(ResumeRefused, match=r"(?s)model.precision: saved .fp32., now .bf16..*reshard"):
        run_dir.check_start(from_dict(Recipe, tiny_recipe(tmp_path / "d", tmp_path / "run", model={"precision": "bf16"},
                                                   parallel={"zero_stage": 1})), 1)  # (bf16 weights need ZeRO)


def test_train_refuses_a_changed_model_before_any_process_group(tmp_path, capsys):
    import torch.distributed as dist

    from sedd_scale.train import main as train

    raw = tiny_recipe(tmp_path / "d", tmp_path / "run")
    fake_checkpoint(tmp_path / "run", raw)
    code = train.main([write_recipe(tmp_path / "r.yaml", raw), "--set", "model.n_blocks=4"])
    assert code == 2 and "model.n_blocks: saved 2, now 4" in capsys.readouterr().err
    assert not dist.is_initialized()
    assert (tmp_path / "run" / "step_000000003" / "meta.json").is_file()  # nothing touched


def test_resume_false_in_a_used_directory_is_refused_unless_starting_over(tmp_path):
    raw = tiny_recipe(tmp_path / "d", tmp_path / "run", checkpoint={"resume": False})
    fake_checkpoint(tmp_path / "run", raw)
    with pytest.raises(RecipeError, match="holds checkpoints of a run.*checkpoint.start_over=true"):
        run_dir.check_start(from_dict(Recipe, raw), 1)
    assert (tmp_path / "run" / "latest").is_file()
    over = tiny_recipe(tmp_path / "d", tmp_path / "run", checkpoint={"resume": False, "start_over": True})
    assert run_dir.check_start(from_dict(Recipe, over), 1).start_over
    assert [p.name for p in run_dir.start_over(tmp_path / "run")] == ["step_000000003"]
    assert not (tmp_path / "run" / "latest").exists()
    with pytest.raises(RecipeError, match="start_over=true discards the run's checkpoints: it needs resume=false"):
        from_dict(Recipe, tiny_recipe(tmp_path / "d", tmp_path / "run", checkpoint={"start_over": True}))


def test_the_pre_flight_reads_a_step_an_interrupted_re_save_set_aside_and_touches_nothing(tmp_path):
    raw = tiny_recipe(tmp_path / "d", tmp_path / "run")
    fake_checkpoint(tmp_path / "run", raw)
    final = tmp_path / "run" / step_name(3)
    aside = tmp_path / "run" / f".tmp-old-{final.name}-1765000000000000000"
    os.rename(final, aside)  # a crash between the re-save's two renames
    start = run_dir.check_start(from_dict(Recipe, raw), 1)
    assert start.latest == aside and start.describe()[0] == f"resume: {final} (put back from {aside}, where an " \
                                                            "interrupted re-save left it)", start.describe()
    assert aside.is_dir() and not final.exists()


@pytest.mark.slow
def test_a_start_after_a_crash_between_a_re_saves_renames_puts_the_step_back_and_resumes_it(tmp_path, data):
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(data, run, train={"steps": 2}))
    code, out = train_main(recipe)
    assert code == 0, out
    aside = run / ".tmp-old-step_000000002-1765000000000000000"
    os.rename(run / step_name(2), aside)  # the step `latest` names, set aside; its new copy never renamed in
    staging = CheckpointDir(run).staging(2, "crashed")
    staging.mkdir()
    code, out = train_main(recipe, "--set", "train.steps=3")
    assert code == 0, out
    assert f"restored {run / step_name(2)}: a re-save of it was interrupted" in out, out
    assert "resumed from step 2" in out, out
    assert not aside.exists() and not staging.exists()
    assert [p.name for p in CheckpointDir(run).steps()] == [step_name(s) for s in (1, 2, 3)]
    assert CheckpointDir(run).latest().name == step_name(3)


# --- the run lock -----------------------------------------------------------------------------------
HOLD = """
import sys, time
from sedd_scale.checkpoint.run_lock import RunLock
RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(60)
"""


def test_a_busy_run_directory_is_refused_naming_the_holder_and_a_dead_holder_does_not_block(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirBusy, match=rf"in use by host \S+ pid {holder.pid} .*another checkpoint.dir"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == holder.pid  # the dead holder's record stays
    with RunLock(tmp_path) as lock:  # ... and does not block
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
        with pytest.raises(RunDirBusy):
            RunLock(tmp_path).acquire()  # another open file description in the same process is refused too
    RunLock(tmp_path).acquire().release()


# --- metrics across a resume ----------------------------------------------------------------------
class FullDisk:
    """A metrics JSONL file on a full disk: every write fails with ENOSPC (what was written before stays)."""

    def __init__(self, f):
        self.f = f

    def write(self, text):
        import errno

        raise OSError(errno.ENOSPC, "No space left on device")

    def flush(self):
        self.f.flush()

    def close(self):
        self.f.close()


def test_metrics_jsonl_drops_replayed_steps(tmp_path):
    m = Metrics(tmp_path, total_steps=10)
    for step in range(1, 7):
        m.scalars(step, {"train/loss_per_token": float(step)})
    m.close()
    m = Metrics(tmp_path, total_steps=10, start_step=4)  # resumed from the checkpoint of step 4
    for step in (5, 6):
        m.scalars(step, {"train/loss_per_token": 10.0 + step})
    m.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["train/loss_per_token"]) for r in lines if "train/loss_per_token" in r]
    assert losses == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 15.0), (6, 16.0)]
    assert {"step": 4, "event": "resumed", "dropped_records": 2} in lines


@pytest.mark.parametrize("tail, warned", [
    (b'{"step": 4, "train/loss_per_tok', True),  # a full disk cut the record short
    (b'{"step": 4, "note": "\xe2\x82', True),  # ... in the middle of a multi-byte character
    (b"[1, 2", True),
    (b'{"step": 3, "note": "whole"}', False),  # complete but without its newline: kept, the next record follows it
])
def test_a_half_written_last_metrics_line_is_dropped_with_a_warning_and_the_resume_goes_on(tmp_path, capsys, tail,
                                                                                          warned):
    m = Metrics(tmp_path, total_steps=10)
    for step in (1, 2, 3):
        m.scalars(step, {"train/loss_per_token": float(step)})
    m.close()
    path = tmp_path / "metrics.jsonl"
    with open(path, "ab") as f:
        f.write(tail)
    m = Metrics(tmp_path, total_steps=10, start_step=3)  # raised JSONDecodeError before the fix
    m.scalars(4, {"train/loss_per_token": 14.0})
    m.close()
    err = capsys.readouterr().err
    if warned:
        assert f"warning: {path}, line 4: dropped an unreadable record" in err and "a write cut short" in err, err
    else:
        assert "warning" not in err, err
    lines = [json.loads(line) for line in path.read_text().splitlines()]  # every line parses again
    losses = [(r["step"], r["train/loss_per_token"]) for r in lines if "train/loss_per_token" in r]
    assert losses == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 14.0)]
    assert ({"step": 3, "note": "whole"} in lines) == (not warned)


def test_a_full_disk_under_the_metrics_writer_is_named_with_the_free_space(tmp_path, monkeypatch):
    """ENOSPC: one message naming the file, its directory and the free space; what was written stays."""
    import shutil

    from sedd_scale.train.metrics import MetricsError

    m = Metrics(tmp_path, total_steps=10)
    m.scalars(1, {"train/loss_per_token": 1.0})

    m.jsonl = FullDisk(m.jsonl)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(2**40, 2**40 - 2**29, 2**29))
    m.scalars(2, {"train/loss_per_token": 2.0})
    m.scalars(3, {"train/loss_per_token": 3.0})  # after a failure: skipped, the first failure is kept
    path = tmp_path / "metrics.jsonl"
    assert m.failure == (f"could not write {path}: no space left on the filesystem of {tmp_path} (0.50 GiB free): "
                         "free space there"), m.failure
    with pytest.raises(MetricsError) as e:  # nobody took the failure: closing raises it
        m.close()
    assert str(e.value) == m.failure
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1]


EFBIG_METRICS = """
import json, resource, signal, sys
from sedd_scale.train.metrics import Metrics, MetricsError
m = Metrics(sys.argv[1], total_steps=1000)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
for step in range(1, 1000):
    m.scalars(step, {"train/loss_per_token": step / 7})
    if m.failure:
        break
try:
    m.close()
except MetricsError as e:
    print(json.dumps({"step": step, "error": str(e)}))
"""


def test_the_file_size_limit_under_the_metrics_writer_is_named_as_such_and_a_resume_drops_the_cut_record(tmp_path):
    """EFBIG (ulimit -f) is reported as the file-size limit, not as a full disk; the next run goes on."""
    p = subprocess.run([sys.executable, "-c", EFBIG_METRICS, str(tmp_path)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert p.returncode == 0 and p.stdout.strip(), p.stdout + p.stderr
    out = json.loads(p.stdout)
    assert 10 < out["step"] < 999, out
    assert out["error"].startswith(f"could not write {tmp_path}/"), out
    assert "file-size limit (ulimit -f / RLIMIT_FSIZE: 4096 bytes), not a full disk" in out["error"], out
    assert "no space left" not in out["error"], out
    resumed = subprocess.run([sys.executable, "-c", "import sys; from sedd_scale.train.metrics import Metrics; "
                              "Metrics(sys.argv[1], total_steps=1000, start_step=5).close()", str(tmp_path)],
                             capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert resumed.returncode == 0 and "dropped an unreadable record" in resumed.stderr, resumed.stderr
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 5], lines  # and the resume marker


# --- recipe parsing -----------------------------------------------------------------------------------
@pytest.mark.parametrize("text, message", [
    ("optim:\n  lr: 1e-3\n  lr: 2e-3\n", "line 3, column 3: found the key 'lr' twice (first on line 2)"),
    ("optim: {lr: 1e-3\n", "r.yaml, line 2, column 1"),
    ("model: {}\ndata: {manifests: [a]}\noptim: {lr: .inf}\n", "optim.lr: expected a finite number, got inf"),
    ("model: {}\ndata: {manifests: [a]}\noptim: {lr: .nan}\n", "optim.lr: expected a finite number, got nan"),
])
def test_recipe_syntax_errors_duplicates_and_non_finite_numbers_name_the_place(tmp_path, text, message):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=str(path)) as e:
        load_recipe(path)
    assert message in str(e.value), str(e.value)


def test_a_non_utf8_recipe_is_named(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes(b"model: {name: \xff}\n")
    with pytest.raises(RecipeError, match=f"{path} is not UTF-8 text"):
        load_recipe(path)


def test_a_missing_manifest_is_refused_before_any_process_group(tmp_path, capsys):
    import torch.distributed as dist

    from sedd_scale.train import main as train

    code = train.main([write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path / "nowhere", tmp_path / "run"))])
    assert code == 2 and "does not exist: prepare it with tools/prepare_data.py" in capsys.readouterr().err
    assert not dist.is_initialized() and not (tmp_path / "run").exists()


# --- end to end: divergence, rollback, a lower learning rate ---------------------------------------
@pytest.mark.slow
def test_a_diverged_run_points_latest_before_the_streak_and_a_lower_lr_resumes_cleanly(tmp_path, data):
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(data, run))
    code, out = train_main(recipe)
    assert code == 0, out
    assert [p.name for p in CheckpointDir(run).steps()] == [step_name(s) for s in (1, 2, 3)]

    # lr 1e30 from the resumed run: step 4's update is finite but absurd, steps 5 and 6 are non-finite.
    code, out = train_main(recipe, "--set", "optim.lr=1e30", "optim.warmup=0", "train.steps=20",
                           "train.max_nonfinite_steps=2")
    assert code == 1, out
    assert "applied from the current recipe: optim.lr: saved 0.01, now 1e+30" in out, out
    assert "2 consecutive steps had non-finite losses or gradients (steps 5-6)" in out, out
    assert f"now names {run / 'step_000000003'}, the newest checkpoint from before the streak" in out, out
    assert CheckpointDir(run).latest().name == "step_000000003"
    assert (run / "diverged-step_000000004").is_dir()  # kept for inspection, never resumed
    assert not (run / "step_000000005").exists() and not (run / "step_000000006").exists()  # none while skipping

    code, out = train_main(recipe, "--set", "optim.lr=1e-3", "train.steps=6")
    assert code == 0, out
    assert "resumed from step 3" in out and "optim.lr: saved 0.01, now 0.001" in out, out
    logged = [r for r in records(run) if "train/loss_per_token" in r]
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6], logged  # replayed steps are not duplicated
    assert all(r["train/skipped_steps"] == 0 for r in logged), logged
    assert [r["train/lr"] for r in logged[3:]] == [1e-3] * 3, logged  # the new lr, not the saved one
    assert CheckpointDir(run).latest().name == "step_000000006"


def _write_fails(recipe_path: str) -> dict:
    """Train 2 steps, then make every file write fail: a file-size limit (`ulimit -f`: EFBIG), then a full disk
    (ENOSPC, from the write itself); each in a synchronous and an asynchronous save."""
    import errno
    import os
    import resource
    import signal

    from sedd_scale.checkpoint import files
    from sedd_scale.checkpoint.sharded import CheckpointError
    from sedd_scale.config import load_recipe
    from sedd_scale.data.loader import LoaderConfig, TokenLoader
    from sedd_scale.distributed import engine
    from sedd_scale.train.trainer import Trainer

    recipe = load_recipe(recipe_path)
    layout, topology = engine.setup(recipe)
    loader = TokenLoader(LoaderConfig(list(recipe.data.manifests), 8, layout.micro_batch, global_batch=4))
    trainer = Trainer(recipe, layout, topology, loader=loader)
    trainer.fit(max_steps=2)
    out = {"latest": trainer.checkpoints.latest().name}

    def saves(cause: str) -> None:
        for mode in ("sync", "async"):
            try:
                trainer.fit(max_steps=1) if mode == "async" else trainer.save(sync=True)
                out[f"{cause} {mode}"] = "no error"
            except CheckpointError as e:
                out[f"{cause} {mode}"] = str(e)
        out[f"{cause} left"] = sorted(p.name for p in Path(recipe.checkpoint.dir).iterdir())

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
    try:
        saves("EFBIG")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    real_init = files.HashingWriter.__init__

    class FillingDisk:  # the file object under the hashing one: write(2) fails once the file holds 4 KiB
        def __init__(self, f):
            self.f = f

        def write(self, data) -> int:
            if self.f.tell() + len(data) > 4096:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(data)

        def flush(self) -> None:
            self.f.flush()

    files.HashingWriter.__init__ = lambda self, f: real_init(self, FillingDisk(f))
    try:
        saves("ENOSPC")
    finally:
        files.HashingWriter.__init__ = real_init
    resumed = Trainer(recipe, layout, topology, loader=TokenLoader(
        LoaderConfig(list(recipe.data.manifests), 8, layout.micro_batch, global_batch=4)))
    out["resumed"] = (resumed.resume(), resumed.step)
    return out


@pytest.mark.slow
def test_a_failed_checkpoint_write_is_named_cleaned_up_and_the_previous_one_resumes(tmp_path, data):
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(data, run, train={"steps": 10, "save_every": 1}))
    out = launch(_write_fails, 1, recipe, timeout=600)[0]
    assert out["latest"] == "step_000000002"
    for mode in ("sync", "async"):  # the async write fails in its thread and is raised at the next step
        limit, full = out[f"EFBIG {mode}"], out[f"ENOSPC {mode}"]
        assert f"could not write checkpoint file {run}/.tmp-step_" in limit, out
        assert "file-size limit, 4096 bytes" in limit and "ulimit -f unlimited" in limit, out
        assert "not a full disk" in limit and "is full" not in limit and "still had" not in limit, out
        assert f"could not write checkpoint file {run}/.tmp-step_" in full, out
        assert f"the filesystem of {run} is full (ENOSPC" in full and "GiB free and this rank still had" in full, out
        assert "ulimit" not in full, out
        for message in (limit, full):
            assert "the previous checkpoint stays `latest`" in message, out
    for cause in ("EFBIG", "ENOSPC"):  # staging removed, nothing else touched
        assert not [name for name in out[f"{cause} left"] if name.startswith(".tmp-")], out[f"{cause} left"]
    assert out["resumed"] == (True, 2), out


def error_lines(out: str) -> list[str]:
    """The lines of a run's output that report an error, after checking that no traceback came with them."""
    assert "Traceback" not in out, out
    return [line for line in out.splitlines() if line.startswith("error: ")]


@pytest.mark.slow
def test_a_resume_on_a_missing_shard_or_on_data_prepared_again_is_one_clear_line(tmp_path):
    from sedd_scale.data.prepare import PrepareConfig, prepare
    from tests.test_data_prepare import documents

    data, run = tmp_path / "d", tmp_path / "run"
    config = PrepareConfig(data, tokenizer="byte", seq_len=8, valid_fraction=0.1, workers=1, seqs_per_sample=4,
                           shard_tokens=8 * 32, progress=False, overwrite=True)
    prepare({"train": iter(documents(60))}, config, {})
    raw = tiny_recipe(data, run, model={"num_tokens": 257}, train={"steps": 2})
    raw["data"]["tokenizer"] = "byte"
    recipe = write_recipe(tmp_path / "r.yaml", raw)
    code, out = train_main(recipe)
    assert code == 0, out

    shard = data / "train-000001.tar"
    shard.rename(tmp_path / "aside.tar")  # lost before the resume: the advice is to restore it, not to skip it
    code, out = train_main(recipe, "--set", "train.steps=3")
    assert code == 2, out
    assert error_lines(out) == [f"error: missing shard {shard}: restore it: this run resumes from a checkpoint, and "
                                "leaving the shard out (data.skip_corrupt) or preparing the data again changes the "
                                "data stream, which a resume refuses; or start a new checkpoint.dir with "
                                "data.skip_corrupt: true to train without it"], out
    (tmp_path / "aside.tar").rename(shard)

    prepare({"train": iter(documents(60, seed=1))}, config, {})  # prepare_data --overwrite under the run
    code, out = train_main(recipe, "--set", "train.steps=3")
    assert code == 2, out
    (line,) = error_lines(out)
    assert line.startswith(f"error: cannot resume on {data / 'manifest.json'}: the dataset changed since the "
                           "checkpoint was saved"), line
    assert line.endswith("restore the dataset the run was trained on, or start a new checkpoint.dir to train on this "
                         "one (to keep the weights: tools/convert_checkpoint.py consolidate, then shard --recipe)")
    assert CheckpointDir(run).latest().name == "step_000000002"  # nothing written, nothing lost


@pytest.mark.slow
def test_an_empty_valid_split_is_said_not_skipped_silently(tmp_path):
    from sedd_scale.data.manifest import TokenizerInfo
    from sedd_scale.data.prepare import write_sequences

    rng = np.random.default_rng(0)
    write_sequences(tmp_path / "d", {"train": rng.integers(0, 11, (64, 8)), "valid": np.zeros((0, 8), dtype=np.int64)},
                    TokenizerInfo("tiny", 11, 10), seqs_per_sample=8, seqs_per_shard=64)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path / "d", tmp_path / "run", train={"steps": 1}))
    code, out = train_main(recipe)
    assert code == 0, out
    assert "the valid split of" in out and "is empty: no validation ELBO will be reported" in out, out


def _metrics_disk_full(argv: list[str], fail_at: int) -> tuple[int, str]:
    """sedd_scale.train.main whose metrics JSONL is on a disk that is full from the record of step `fail_at` on."""
    from sedd_scale.train import metrics

    scalars = metrics.Metrics.scalars

    def filling(self, step, values):
        if step >= fail_at and self.enabled and not isinstance(self.jsonl, FullDisk):
            self.jsonl = FullDisk(self.jsonl)
        scalars(self, step, values)

    metrics.Metrics.scalars = filling
    return _main(argv)


@pytest.mark.slow
def test_a_full_disk_under_the_metrics_stops_the_run_with_one_line_and_the_run_resumes(tmp_path, data):
    """ENOSPC from the metrics writer mid-run: exit 1 with the message (file, free space, where the run resumes
    from), the checkpoint being written is committed or removed (no staging folder left), nothing committed lost."""
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(data, run, train={"steps": 8, "save_every": 2}))
    code, out = launch(_metrics_disk_full, 1, [recipe], 5, timeout=600)[0]  # a raw OSError traceback before the fix
    assert code == 1, out
    jsonl = run / "tensorboard" / "metrics.jsonl"
    assert (f"error: could not write {jsonl}: no space left on the filesystem of {run / 'tensorboard'} (" in out
            and " GiB free): free space there" in out), out
    assert f"training stopped at step 5; it resumes from {run / 'step_000000004'}" in out, out
    assert "Traceback" not in out, out
    assert not [p.name for p in run.iterdir() if p.name.startswith(".tmp-")], sorted(run.iterdir())
    assert CheckpointDir(run).latest().name == "step_000000004"
    code, out = train_main(recipe)  # the disk has room again
    assert code == 0 and "resumed from step 4" in out, out
    assert re.findall(r"step (\d+): validation ELBO", out) == ["8"], out  # the step it was measured at
    assert [r["step"] for r in records(run) if "train/loss_per_token" in r] == list(range(1, 9))


def _signal_during(argv: list[str], at_step: int) -> tuple[int, str, list[tuple[str, int]]]:
    """sedd_scale.train.main with a SIGTERM arriving during training step `at_step`; returns the exit code, the
    output and the (validate / samples, step) calls made after the signal."""
    import os
    import signal

    from sedd_scale.train.trainer import Trainer

    after: list[tuple[str, int]] = []
    train_step, validate, samples = Trainer.train_step, Trainer.validate, Trainer.samples

    def stepping(self, *args, **kwargs):
        if self.step + 1 == at_step:
            os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler does; the trainer's handler notes it
        return train_step(self, *args, **kwargs)

    def validating(self, *args, **kwargs):
        if self.stop.raised:
            after.append(("validate", self.step))
        return validate(self, *args, **kwargs)

    def sampling(self, *args, **kwargs):
        if self.stop.raised:
            after.append(("samples", self.step))
        return samples(self, *args, **kwargs)

    Trainer.train_step, Trainer.validate, Trainer.samples = stepping, validating, sampling
    code, out = _main(argv)
    return code, out, after


@pytest.mark.slow
@pytest.mark.parametrize("at_step", [4, 5])
def test_sigterm_goes_straight_to_the_checkpoint_and_143_without_validation_or_samples(tmp_path, data, at_step):
    """A SIGTERM during a step where validation is due (4) or not (5, the last one at 4): the pre-emption
    checkpoint and exit 143, no validation or samples after the signal, no validation line naming another step."""
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(data, run, train={"steps": 100, "eval_every": 2,
                                                                               "save_every": 100}))
    code, out, after = launch(_signal_during, 1, [recipe], at_step, timeout=600)[0]
    assert code == 143, out
    assert after == [], after
    assert re.search(rf"SIGTERM at step {at_step}: checkpoint \S+step_{at_step:09d} written in", out), out
    assert CheckpointDir(run).latest().name == step_name(at_step)
    valid = [r["step"] for r in records(run) if "valid/elbo_nats_per_token" in r]
    assert valid == ([2, 4] if at_step == 5 else [2]), valid
    # Each validation is printed as it is measured, and none after the signal: the grace period is for the exit.
    assert re.findall(r"step (\d+): validation ELBO", out) == [str(s) for s in valid], out



def _fails_in_step(argv: list[str], at_step: int) -> tuple[int, str]:
    """sedd_scale.train.main whose training step `at_step` raises (a shard found corrupt mid-run)."""
    from sedd_scale.data.shards import ShardError
    from sedd_scale.train.trainer import Trainer

    train_step = Trainer.train_step

    def failing(self, *args, **kwargs):
        if self.step + 1 == at_step:
            raise ShardError("shard-00001.tar is corrupt (injected by the test)")
        return train_step(self, *args, **kwargs)

    Trainer.train_step = failing
    return _main(argv)


@pytest.mark.slow
def test_an_error_while_a_checkpoint_is_being_written_leaves_no_staging_folder(tmp_path, data):
    """Step 2's save is written in the background and committed at step 3's end; step 3 fails first: the
    uncommitted folder is removed, step 1 stays latest."""
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(data, run, train={"steps": 10, "save_every": 1}))
    code, out = launch(_fails_in_step, 1, [recipe], 3, timeout=600)[0]
    assert code == 2 and "error: shard-00001.tar is corrupt" in out, out
    assert not [p.name for p in run.iterdir() if p.name.startswith(".tmp-")], sorted(run.iterdir())
    assert CheckpointDir(run).latest().name == "step_000000001"


def test_a_meta_json_recipe_from_before_the_objective_key_resumes_unchanged(tmp_path):
    """A checkpoint written before `diffusion.objective` existed (its meta.json recipe lacks the key) compares as
    the same run: the saved recipe is read with today's defaults. Another objective is refused on resume."""
    raw = tiny_recipe(tmp_path / "d", tmp_path / "run")
    fake_checkpoint(tmp_path / "run", raw)
    meta_path = tmp_path / "run" / step_name(3) / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["recipe"]["diffusion"]["objective"]  # as the re-lay's predecessor wrote it
    meta_path.write_text(json.dumps(meta))
    assert run_dir.check_start(from_dict(Recipe, raw), 1).changes == []
    saved = to_dict(from_dict(Recipe, raw))
    other = {**saved, "diffusion": {**saved["diffusion"], "objective": "masked_ce"}}
    with pytest.raises(ResumeRefused, match=r"diffusion.objective: saved 'score_entropy', now 'masked_ce' "
                                            r"\(changes the training objective\)"):
        check_resume(saved, other, {"tp": 1}, {"tp": 1}, checkpoint="c", run_dir="r")
