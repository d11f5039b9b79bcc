"""One prepared check of a GPU machine, in parts of at most 5 minutes each on one H100 (so a short reservation can
run and rerun them); with --device cpu --quick, the same rows on tiny shapes on any CPU.

    python benchmarks/gpu_check.py --list-parts             # the parts, their rows and time budgets
    python benchmarks/gpu_check.py --part 1                 # one part (each budget is enforced: a part that runs
    python benchmarks/gpu_check.py --part 2 5               #   over it stops, its unfinished rows FAIL)
    python benchmarks/gpu_check.py                          # every part in turn
    python benchmarks/gpu_check.py --rows resume planner-memory    # some rows (with the rows they need)
    python benchmarks/gpu_check.py --device cpu --quick     # every row on tiny shapes (CI runs it)

Rows (each in fresh processes, so one failure does not hide the rest; the table says which passed):
  train-fp32, train-bf16-mixed   the main job's model on synthetic Markov-chain tokens (no download: a GPU machine
                           reaches nothing) through `python -m sedd_scale.train`: finite, decreasing loss
  train-bf16-pp2           the same with bf16 weights (DeepSpeed's BF16_Optimizer with fp32 master weights under the
                           pipeline engine, ZeRO-1) on 2 pipeline stages, 2 micro-batches per step, model.compile on
                           (CUDA; the stages' compile warm-up): needs 2 GPUs (skipped on one, saying so); on a CPU two
                           gloo processes, eager
  resume                   the fp32 run killed (SIGKILL) after a checkpoint and restarted: the losses after the
                           restart against the uninterrupted run's (CPU: bitwise; CUDA: within RESUME_RTOL, since
                           embedding-gradient atomics and the memory-efficient attention backward are
                           nondeterministic there)
  convert                  consolidate the killed-and-resumed run's checkpoint offline, evaluate it
                           (tools/evaluate.py) and sample from it (tools/sample.py)
  planner-memory           the layout planner's per-phase memory (sedd_scale/plan/memory.py: forward, backward,
                           optimizer step, peak) against the measured peak inside engine.forward / backward / step
                           (CUDA: torch.cuda.max_memory_allocated; CPU: every live tensor counted,
                           sedd_scale/testing/step_memory.py): both printed with their ratio; fails past
                           PLANNER_TOLERANCE
  step-small, step-medium  sedd-small / sedd-medium training steps (bf16-mixed, ZeRO-1) at the largest micro batch
                           that fits (doubling from 4 up to 64), with and without activation checkpointing, and the
                           largest batch again with model.compile flipped: step time, tokens/s, model TFLOP/s
                           (flops.training_flops_per_token), MFU against the GPU's bf16 peak, peak memory
  loss                     fused vocab-parallel head + loss vs the naive one: peak memory and time
  sampler                  sampling tokens/s (analytic, absorb), sample.py-equivalent
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

RESUME_RTOL = {"cpu": 0.0, "cuda": 1e-3}
# |planned / measured - 1| allowed per phase. CPU: the planner's own test (tests/test_planner.py). CUDA: more, for
# what the planner does not model: cuBLAS and attention workspaces, the allocator's 512-byte rounding.
PLANNER_TOLERANCE = {"cpu": 0.15, "cuda": 0.20}


@dataclass
class Settings:
    """Shapes and lengths of one mode."""

    device: str
    quick: bool
    work: Path
    steps: int = 50
    hidden: int = 128
    blocks: int = 4
    length: int = 128
    batch: int = 16
    timeout: float = 600.0
    deadline: float = math.inf  # time.monotonic() at which the running part's budget ends
    env: dict = field(default_factory=dict)

    def limit(self) -> float:
        """Seconds a subprocess may run: its own timeout, cut to what is left of the part's budget."""
        return max(1.0, min(self.timeout, self.deadline - time.monotonic()))

    @classmethod
    def make(cls, device: str, quick: bool, work: Path) -> "Settings":
        s = cls(device, quick, work)
        if quick:
            s.steps, s.hidden, s.blocks, s.length, s.batch, s.timeout = 16, 64, 2, 32, 8, 240.0
        s.env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}", "PYTHONWARNINGS": "ignore",
                 "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
        if device == "cpu":
            s.env["CUDA_VISIBLE_DEVICES"] = ""  # the trainer picks CUDA whenever it sees one
        return s


@dataclass
class Row:
    """One line of the table."""

    name: str
    ok: bool | None  # None: skipped, with the reason in `numbers`
    numbers: str
    seconds: float = 0.0

    @property
    def verdict(self) -> str:
        """PASS, FAIL or SKIP."""
        return "SKIP" if self.ok is None else "PASS" if self.ok else "FAIL"


def write_data(folder: Path, length: int, seed: int = 0) -> Path:
    """Sequences of a sparse random Markov chain over the byte vocabulary (learnable, so the loss falls)."""
    import numpy as np

    from sedd_scale.data.manifest import TokenizerInfo
    from sedd_scale.data.prepare import write_sequences

    rng = np.random.default_rng(seed)
    vocab = 257
    successors = rng.integers(0, vocab, size=(vocab, 4))  # each token is followed by one of 4

    def draw(n: int) -> np.ndarray:
        out = np.empty((n, length), dtype=np.int64)
        out[:, 0] = rng.integers(0, vocab, n)
        for i in range(1, length):
            out[:, i] = successors[out[:, i - 1], rng.integers(0, 4, n)]
        return out

    write_sequences(folder, {"train": draw(4096), "valid": draw(64), "test": draw(64)},
                    TokenizerInfo("markov", vocab, vocab - 1), seqs_per_sample=8, seqs_per_shard=1024)
    return folder / "manifest.json"


def recipe(s: Settings, manifest: Path, run: Path, precision: str = "fp32", save_every: int | None = None,
           parallel: dict | None = None, compile: bool = False) -> Path:
    """The main job's recipe (cpu-tiny's model) on the synthetic data."""
    import yaml

    data = {"model": {"hidden_size": s.hidden, "n_heads": 4, "n_blocks": s.blocks, "cond_dim": 64, "num_tokens": 257,
                      "length": s.length, "dropout": 0.0, "vocab_multiple": 1, "precision": precision,
                      "compile": compile},
            "data": {"manifests": [str(manifest)], "tokenizer": None, "seq_len": s.length, "num_workers": 1},
            "optim": {"lr": 2e-3, "warmup": 5, "schedule": "cosine", "min_lr": 1e-4},
            "parallel": {"micro_batch": s.batch, "global_batch": s.batch, "zero_stage": 1, **(parallel or {})},
            "train": {"steps": s.steps, "ema": 0.99, "log_every": 1, "eval_every": s.steps,
                      "save_every": save_every or s.steps, "keep_last": 2, "eval_batches": 2, "eval_draws": 2,
                      "sample_steps": 8},
            "checkpoint": {"dir": str(run)}}
    path = run.parent / f"{run.name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _train(s: Settings, recipe_path: Path, nproc: int = 1) -> subprocess.Popen:
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1
              else [sys.executable])
    # A session of its own: a part out of time kills the whole group (torchrun's workers too).
    return subprocess.Popen([*launch, "-m", "sedd_scale.train", str(recipe_path)], cwd=ROOT, env=s.env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait(s: Settings, proc: subprocess.Popen) -> str:
    """The process's output once it exits; killed (with its group) if the part's budget runs out first."""
    try:
        out, _ = proc.communicate(timeout=s.limit())
        return out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


def _losses(run: Path, key: str = "train/loss_per_token") -> dict[int, float]:
    records = [json.loads(line) for line in (run / "tensorboard" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in records if key in r}


def row_train(s: Settings, manifest: Path, precision: str, pp: int = 1) -> Row:
    """The main job for s.steps steps: finite, the last fifth's mean loss below the first fifth's, every gradient norm
    finite and positive."""
    name = f"train-{precision}" + (f"-pp{pp}" if pp > 1 else "")
    parallel, compile = None, False
    if pp > 1:
        if s.device == "cuda":
            import torch

            if torch.cuda.device_count() < pp:
                return Row(name, None, f"skipped: {pp} pipeline stages need {pp} GPUs, this machine has "
                                       f"{torch.cuda.device_count()} (NCCL cannot put two ranks on one GPU)")
        # 2 micro-batches per step, so the 1F1B schedule overlaps the stages; compiled on a GPU (the recipes' setting,
        # with the stages' compile warm-up), eager on a CPU (inductor's compile is half a minute there).
        parallel = {"pp": pp, "zero_stage": 1, "micro_batch": s.batch // 2, "global_batch": s.batch}
        compile = s.device == "cuda"
    run = s.work / name
    proc = _train(s, recipe(s, manifest, run, precision, parallel=parallel, compile=compile), nproc=pp)
    out = _wait(s, proc)
    if proc.returncode != 0:
        return Row(name, False, f"exit {proc.returncode}: {out.strip().splitlines()[-1:]}")
    losses = [v for _, v in sorted(_losses(run).items())]
    fifth = max(1, len(losses) // 5)
    first, last = sum(losses[:fifth]) / fifth, sum(losses[-fifth:]) / fifth
    # A zero gradient norm: no gradient reached the optimizer (bf16 weights under the pipeline engine did that).
    norms = list(_losses(run, "train/grad_norm").values())
    ok = (len(losses) == s.steps and all(math.isfinite(v) for v in losses) and last < first
          and len(norms) == s.steps and all(math.isfinite(v) and v > 0 for v in norms))
    valid = next((line for line in out.splitlines() if "validation ELBO" in line), "no validation line")
    layout = f"PP{pp} ZeRO-1, {'compiled' if compile else 'eager'}; " if pp > 1 else ""
    return Row(name, ok, f"{layout}loss/token {first:.3f} -> {last:.3f} over {len(losses)} steps; gradient norm "
                         f"{min(norms, default=math.nan):.3g}-{max(norms, default=math.nan):.3g}; "
                         f"{valid.split(': ', 1)[-1]}")


def row_resume(s: Settings, manifest: Path) -> Row:
    """Kill the fp32 run (SIGKILL) once its mid-run checkpoint is committed, restart it, compare with train-fp32."""
    reference = _losses(s.work / "train-fp32")
    run = s.work / "resume"
    half = s.steps // 2
    path = recipe(s, manifest, run, "fp32", save_every=half)
    proc = _train(s, path)
    deadline = time.monotonic() + s.limit()
    while time.monotonic() < deadline and proc.poll() is None:
        latest = run / "latest"
        if latest.exists() and latest.read_text().strip() == f"step_{half:09d}":
            proc.send_signal(signal.SIGKILL)  # no checkpoint, no cleanup: as a node failure
            break
        time.sleep(0.02)
    _wait(s, proc)
    killed_at = max(_losses(run))
    proc = _train(s, path)
    out = _wait(s, proc)
    if proc.returncode != 0 or "resumed from step" not in out:
        return Row("resume", False, f"restart exit {proc.returncode}: {out.strip().splitlines()[-1:]}")
    after = _losses(run)
    steps = [k for k in sorted(after) if k > half]
    worst = max(abs(after[k] - reference[k]) / abs(reference[k]) for k in steps)
    ok = steps == list(range(half + 1, s.steps + 1)) and worst <= RESUME_RTOL[s.device]
    return Row("resume", ok, f"killed at step {killed_at} (checkpoint {half}), restarted: steps {steps[0]}-{steps[-1]} "
                             f"vs the uninterrupted run, max relative difference {worst:.2e} "
                             f"(tolerance {RESUME_RTOL[s.device]:g})")


def row_convert(s: Settings, manifest: Path) -> Row:
    """Consolidate the resumed run's EMA offline, evaluate it and sample from it with the tools."""
    from sedd_scale.apps import convert

    out = s.work / "consolidated"
    started = time.perf_counter()
    summary = convert.consolidate(s.work / "resume", out, weights="ema")
    took = time.perf_counter() - started
    result = s.work / "eval.json"
    ev = subprocess.run([sys.executable, "tools/evaluate.py", str(out), "--manifest", str(manifest), "--split", "test",
                         "--draws", "2", "--out", str(result)], cwd=ROOT, env=s.env, capture_output=True, text=True,
                        timeout=s.limit())
    samples = s.work / "samples.jsonl"
    sm = subprocess.run([sys.executable, "tools/sample.py", str(out), "--num-samples", "4", "--steps", "16",
                         "--tokenizer", "none", "--out", str(samples)], cwd=ROOT, env=s.env, capture_output=True,
                        text=True, timeout=s.limit())
    if ev.returncode or sm.returncode:
        bad = ev if ev.returncode else sm
        return Row("convert", False, f"{bad.args[2]} exit {bad.returncode}: {bad.stderr.strip().splitlines()[-1:]}")
    nats = json.loads(result.read_text())["nats_per_token"]
    lines = samples.read_text().splitlines()
    ok = math.isfinite(nats) and len(lines) == 4
    return Row("convert", ok, f"consolidated step {summary['step']} in {took:.1f} s; test ELBO {nats:.3f} nats/token; "
                              f"{len(lines)} samples written")


# sedd-small / sedd-medium dims (recipes/sedd-small.yaml, sedd-medium.yaml) and their --quick stand-ins.
STEP_MODELS = {"small": dict(hidden=768, heads=12, blocks=12, cond=128, length=1024),
               "medium": dict(hidden=1024, heads=16, blocks=24, cond=128, length=1024)}
QUICK_STEP_MODEL = dict(hidden=64, heads=4, blocks=2, cond=32, length=64)


def _peak_tflops(device: str) -> float | None:
    """The bf16 dense peak of this GPU if the planner knows it (H100, A100, H200), else None (no MFU)."""
    if device != "cuda":
        return None
    import torch

    from sedd_scale.plan import GPUS

    name = torch.cuda.get_device_name().lower()
    return next((g.bf16_tflops for key, g in GPUS.items() if key in name), None)


def step_worker(spec: dict) -> dict:
    """In this process: bf16-mixed training steps of one model at doubling micro batches until one does not fit
    (or the cap), with and without activation checkpointing; then the largest batch with the compile switch
    flipped. Returns the measurements."""
    import resource

    import torch
    from bench_step import Case, build_trainer, check_compile, checked_step, fresh_inductor_cache

    from sedd_scale.distributed import parallel
    from sedd_scale.plan.flops import projected_fraction, training_flops_per_token

    fresh_inductor_cache()
    cuda = spec["device"] == "cuda"
    dims = QUICK_STEP_MODEL if spec["quick"] else STEP_MODELS[spec["model"]]
    steps, warmup = (2, 1) if spec["quick"] else (5, 2)

    def run(batch: int, recompute: bool, compiled: bool) -> dict | None:
        case = Case(spec["model"], dims["hidden"], dims["heads"], dims["blocks"], dims["cond"], "absorb", batch,
                    dims["length"])
        with tempfile.TemporaryDirectory() as run_dir:
            trainer = None
            try:
                if cuda:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                # Every compile switch from `compiled`, set before the trainer is built (the loss's and the LayerNorm
                # kernel choice are derived then), and checked: the switches held, the regions the first step runs.
                trainer = build_trainer(case, 0.0, run_dir, precision="bf16-mixed", recompute=recompute, zero_stage=1,
                                        compile=compiled)
                variant = f"step-{spec['model']} {'compiled' if compiled else 'eager'}"
                check_compile(trainer, compiled, variant)
                first_step = checked_step(trainer.train_step, compiled, variant)
                for _ in range(warmup):
                    first_step()
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(steps):
                    trainer.train_step()
                if cuda:
                    torch.cuda.synchronize()
                seconds = (time.perf_counter() - start) / steps
                flops = training_flops_per_token(trainer.model_cfg, case.length, projected_fraction(trainer.recipe))
            except torch.cuda.OutOfMemoryError:  # the batch does not fit: the search ends at the previous one
                return None
            finally:
                if trainer is not None:
                    trainer.saver.close()
                parallel.destroy_parallel()
        memory = (torch.cuda.max_memory_allocated() if cuda
                  else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        return dict(batch=batch, recompute=recompute, compiled=compiled, step_s=seconds,
                    tokens_per_s=case.tokens / seconds, tflops=flops * case.tokens / seconds / 1e12, memory=memory)

    def largest(recompute: bool, start: int) -> dict:
        """Double from `start` while it fits (halve first if `start` does not), up to the cap."""
        best, batch = None, start
        while best is None and batch >= 1:
            best = run(batch, recompute, spec["compile"])
            batch //= 2
        if best is None:
            raise RuntimeError(f"sedd-{spec['model']}: micro batch 1 does not fit (recompute={recompute})")
        while best["batch"] * 2 <= spec["max_batch"]:
            got = run(best["batch"] * 2, recompute, spec["compile"])
            if got is None:
                break
            best = got
        return best

    plain = largest(False, spec["start_batch"])
    found = [plain, largest(True, plain["batch"])]  # recomputing fits at least what not recomputing does
    flipped = run(found[0]["batch"], False, not spec["compile"]) if spec["flip"] else None
    return {"rows": found, "flipped": flipped}


def row_step(s: Settings, model: str) -> Row:
    """sedd-<model> bf16-mixed steps at the largest micro batch that fits, +-recompute, compiled vs eager."""
    # --quick leaves out the compiled run (half a minute of inductor on 2 CPU cores; tests cover the switch).
    spec = {"model": model, "device": s.device, "quick": s.quick, "compile": s.device == "cuda", "flip": not s.quick,
            "start_batch": 1 if s.quick else 4, "max_batch": 2 if s.quick else 64}
    proc = subprocess.run([sys.executable, __file__, "--step-worker", json.dumps(spec)], cwd=ROOT, env=s.env,
                          capture_output=True, text=True, timeout=s.limit())
    result = next((line for line in proc.stdout.splitlines() if line.startswith("RESULT ")), None)
    if proc.returncode or result is None:
        return Row(f"step-{model}", False, f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    got = json.loads(result[len("RESULT "):])
    peak = _peak_tflops(s.device)
    parts = []
    for r in got["rows"] + ([got["flipped"]] if got["flipped"] else []):
        mfu = f", MFU {r['tflops'] / peak:.1%}" if peak else ""
        parts.append(f"B{r['batch']} {'recompute' if r['recompute'] else 'no recompute'} "
                     f"{'compiled' if r['compiled'] else 'eager'}: {r['step_s']:.3f} s/step, "
                     f"{r['tokens_per_s']:.0f} tok/s, {r['tflops']:.2f} TFLOP/s{mfu}, {r['memory'] / 2**30:.1f} GiB")
    ok = all(math.isfinite(r["step_s"]) for r in got["rows"])
    dims = QUICK_STEP_MODEL if s.quick else STEP_MODELS[model]
    name = "tiny stand-in" if s.quick else f"sedd-{model} dims"
    return Row(f"step-{model}", ok, f"{name} (H {dims['hidden']} x {dims['blocks']} blocks, L {dims['length']}), "
               f"bf16-mixed ZeRO-1, largest micro batch that fits: " + "; ".join(parts)
               + ("" if peak else "; MFU: no known peak for this device"))


def row_loss(s: Settings, manifest: Path) -> Row:
    """bench_loss's naive (full logits) vs fused weighted head + loss, one fwd+bwd, on this device."""
    import bench_loss

    args = argparse.Namespace(tokens=512 if s.quick else 8 * 1024, batch=4 if s.quick else 8,
                              hidden=64 if s.quick else 1024, vocab=50258, graph="absorb", chunk_size=None,
                              dtype="float32" if s.device == "cpu" else "bfloat16", iters=1 if s.quick else 3,
                              device=s.device)
    naive, fused = bench_loss.run_row("naive", 1, args), bench_loss.run_row("fused weighted", 1, args)
    ok = fused["peak"] < naive["peak"]
    return Row("loss", ok, f"{args.tokens} tokens, H {args.hidden}, V 50258, {args.dtype}: naive "
                           f"{naive['peak'] / 2**20:.0f} MiB {naive['time'] * 1e3:.1f} ms, fused "
                           f"{fused['peak'] / 2**20:.0f} MiB {fused['time'] * 1e3:.1f} ms "
                           f"({naive['peak'] / max(fused['peak'], 1):.1f}x less memory, "
                           f"{naive['time'] / fused['time']:.2f}x the speed)")


def row_sampler(s: Settings, manifest: Path) -> Row:
    """Sampling tokens/s (analytic, absorb, GPT-2 vocabulary) as tools/sample.py runs it, on this device."""
    script = ("import json, sys; sys.path.insert(0, 'benchmarks'); import bench_sample; "
              f"print('RESULT', json.dumps(bench_sample.end_to_end('absorb', {2 if s.quick else 16}, "
              f"{64 if s.quick else 1024}, {8 if s.quick else 128}, 1, device={s.device!r}, reference=False, "
              f"size={'tiny' if s.quick else 'small'!r})))")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=s.env, capture_output=True, text=True,
                          timeout=s.limit())
    result = next((line for line in proc.stdout.splitlines() if line.startswith("RESULT ")), None)
    if proc.returncode or result is None:
        return Row("sampler", False, f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    got = json.loads(result[len("RESULT "):])
    shape = "B2 x L64, tiny, 8 steps" if s.quick else "B16 x L1024, sedd-small dims, 128 steps"
    return Row("sampler", got["ours"] > 0,
               f"{shape}: {got['ours']:.0f} tokens/s (one forward {got['forward_s']:.3f} s)")


# The planner-memory cases: (model overrides of step_memory.VALIDATION_MODEL, parallel) on one rank. On a GPU sedd-small
# dims at micro 8 x 1024 tokens, 2 micro-batches per step (GiBs: kernels' workspaces are a small share); on a CPU the
# validation model the planner's test measures.
SMALL = {"hidden_size": 768, "n_heads": 12, "n_blocks": 12, "cond_dim": 128, "num_tokens": 50257, "length": 1024}
PLANNER_CASES = {
    "cuda": {"sedd-small bf16-mixed ZeRO-1": ({**SMALL, "precision": "bf16-mixed"},
                                              {"zero_stage": 1, "micro_batch": 8, "global_batch": 16}),
             "sedd-small bf16 ZeRO-1 recompute": ({**SMALL, "precision": "bf16", "activation_checkpointing": True},
                                                  {"zero_stage": 1, "micro_batch": 8, "global_batch": 16})},
    "cpu": {"validation model fp32 ZeRO-1": ({}, {"zero_stage": 1})},
}
PLANNER_BUCKET = {"cpu": 2_000_000, "cuda": None}  # CPU: bench_planner's small ZeRO bucket; CUDA: the recipe's default


class CudaMemory:
    """torch.cuda's allocator counters behind LiveTensorMemory's interface (`current`, `peak`, `reset_peak`), for
    step_memory.measure: `peak` is torch.cuda.max_memory_allocated since it was last set."""

    def __enter__(self):
        import torch

        self._cuda, self._floor = torch.cuda, 0
        self._cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc) -> bool:
        return False

    @property
    def current(self) -> int:
        """Bytes allocated now."""
        return self._cuda.memory_allocated()

    @property
    def peak(self) -> int:
        """The most allocated since `peak` was last set."""
        return max(self._floor, self._cuda.max_memory_allocated())

    @peak.setter
    def peak(self, value: int) -> None:
        self._cuda.reset_peak_memory_stats()
        self._floor = value

    def reset_peak(self) -> None:
        """Start a new peak from what is allocated now."""
        self.peak = self.current


def planner_worker(spec: dict) -> dict:
    """In this process (a world of one): each case's measured bytes per phase (step_memory.measure)."""
    from sedd_scale.testing.step_memory import measure, validation_recipe

    device = spec["device"]
    return {name: measure(validation_recipe(model, parallel, 1, PLANNER_BUCKET[device]), steps=1,
                          meter=CudaMemory if device == "cuda" else None)
            for name, (model, parallel) in PLANNER_CASES[device].items()}


def row_planner_memory(s: Settings, manifest: Path) -> Row:
    """The planner's forward / backward / step / peak bytes against the measured ones, per case."""
    proc = subprocess.run([sys.executable, __file__, "--planner-worker", json.dumps({"device": s.device})], cwd=ROOT,
                          env=s.env, capture_output=True, text=True, timeout=s.limit())
    result = next((line for line in proc.stdout.splitlines() if line.startswith("RESULT ")), None)
    if proc.returncode or result is None:
        return Row("planner-memory", False, f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    from sedd_scale import plan as P
    from sedd_scale.config import Recipe, from_dict
    from sedd_scale.testing.step_memory import validation_recipe

    got, tol, parts, worst = json.loads(result[len("RESULT "):]), PLANNER_TOLERANCE[s.device], [], 0.0
    for name, (model, parallel) in PLANNER_CASES[s.device].items():
        r = from_dict(Recipe, validation_recipe(model, parallel, 1, PLANNER_BUCKET[s.device]))
        planned = P.stage_memory(r, P.candidate_of(r, r.layout(1)), 0, P.Assumptions(device=s.device))
        measured = got[name]
        phases = []
        for phase in (*P.TRAINING_PHASES, "peak"):  # a training step's (validation: bench_planner.py's table)
            plan_bytes = planned.training_peak if phase == "peak" else planned.phase(phase)
            ratio = plan_bytes / measured[phase]
            worst = max(worst, abs(ratio - 1))
            phases.append(f"{phase} {plan_bytes / 2**20:.0f}/{measured[phase] / 2**20:.0f} MiB ({ratio:.2f})")
        parts.append(f"{name}: " + ", ".join(phases))
    meter = "torch.cuda.max_memory_allocated" if s.device == "cuda" else "live tensors"
    return Row("planner-memory", worst <= tol, f"planned/measured ({meter}) per phase: " + "; ".join(parts)
               + f"; worst |ratio - 1| {worst:.1%} (tolerance {tol:.0%})")


ROWS = {"train-fp32": lambda s, m: row_train(s, m, "fp32"),
        "train-bf16-mixed": lambda s, m: row_train(s, m, "bf16-mixed"),
        "train-bf16-pp2": lambda s, m: row_train(s, m, "bf16", pp=2),
        "resume": row_resume,
        "convert": row_convert,
        "planner-memory": row_planner_memory,
        "step-small": lambda s, m: row_step(s, "small"),
        "step-medium": lambda s, m: row_step(s, "medium"),
        "loss": row_loss,
        "sampler": row_sampler}
NEEDS = {"resume": "train-fp32", "convert": "resume"}  # a row that reads the run of another


@dataclass(frozen=True)
class Part:
    """Rows that run together within a time budget (seconds on one H100, enforced; CPU_BUDGET_FACTOR times it on a
    CPU)."""

    rows: tuple[str, ...]
    budget_s: float


# Each part <= 5 minutes on one H100, so a short reservation can run (and rerun) any of them. --device cpu --quick
# (tiny shapes, but 2 shared CI cores starting DeepSpeed processes) gets twice the budgets.
CPU_BUDGET_FACTOR = 2.0
PARTS = {1: Part(("train-fp32", "resume", "convert"), 270),  # the chain: resume restarts train-fp32, convert reads it
         2: Part(("train-bf16-mixed", "train-bf16-pp2", "planner-memory"), 270),
         3: Part(("step-small",), 240),
         4: Part(("step-medium",), 290),
         5: Part(("loss", "sampler"), 180)}


class OutOfTime(Exception):
    """The running part's budget ran out."""


def _alarm(signum, frame):
    raise OutOfTime


def run_part(number: int, part: Part, rows: list[str], s: Settings, manifest: Path) -> list[Row]:
    """The part's selected rows in order, stopped when its budget runs out (the row running then and those after it
    FAIL, saying so)."""
    out: list[Row] = []
    budget = part.budget_s * (CPU_BUDGET_FACTOR if s.device == "cpu" else 1.0)
    s.deadline = time.monotonic() + budget
    signal.signal(signal.SIGALRM, _alarm)  # in-process work (conversion, the loss benchmark) is stopped too
    signal.setitimer(signal.ITIMER_REAL, budget)
    try:
        for name in rows:
            started = time.perf_counter()
            try:
                if time.monotonic() >= s.deadline:
                    raise OutOfTime
                row = ROWS[name](s, manifest)
            except (OutOfTime, subprocess.TimeoutExpired):
                row = Row(name, False, f"stopped: part {number}'s budget of {budget:.0f} s ran out")
            row.seconds = time.perf_counter() - started
            out.append(row)
            # As it happens too: a reservation that ends mid-part still shows the rows done.
            print(f"[part {number}] {row.name}  {row.verdict}  {row.seconds:.1f} s  {row.numbers}", flush=True)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        s.deadline = math.inf
    return out


def list_parts() -> str:
    """The parts, their budgets and rows."""
    return "\n".join(f"part {n}: {p.budget_s:.0f} s budget on one H100: {' '.join(p.rows)}" for n, p in PARTS.items())


def main(argv: list[str] | None = None) -> int:
    """Run the selected parts' rows, print the table; exit 1 if any row failed."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny shapes (minutes on a CPU)")
    p.add_argument("--part", type=int, nargs="+", choices=sorted(PARTS), default=None,
                   help="run these parts (default: all, in turn)")
    p.add_argument("--list-parts", action="store_true", help="print the parts and exit")
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=None,
                   help="only these rows (and the rows they need), within their parts")
    p.add_argument("--work", default=None, help="a directory for the runs (default: a temporary one)")
    p.add_argument("--step-worker", default=None, help=argparse.SUPPRESS)  # internal: one step row's process
    p.add_argument("--planner-worker", default=None, help=argparse.SUPPRESS)  # internal: the planner row's process
    args = p.parse_args(argv)
    if args.list_parts:
        print(list_parts())
        return 0
    if args.step_worker:
        print("RESULT", json.dumps(step_worker(json.loads(args.step_worker))), flush=True)
        return 0
    if args.planner_worker:
        print("RESULT", json.dumps(planner_worker(json.loads(args.planner_worker))), flush=True)
        return 0
    wanted = set(args.rows or ROWS)
    for name in list(wanted):
        while name in NEEDS:  # resume restarts train-fp32's run, convert reads resume's
            name = NEEDS[name]
            wanted.add(name)
    parts = {n: part for n, part in PARTS.items() if n in (args.part or PARTS)}  # NEEDS stay within a part
    if not any(name in wanted for part in parts.values() for name in part.rows):
        print(f"error: none of the rows {sorted(wanted)} is in part(s) {sorted(parts)}; see --list-parts",
              file=sys.stderr)
        return 2
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device here; run with --device cpu --quick to check the code on this CPU",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        s = Settings.make(args.device, args.quick, work)
        manifest = write_data(work / "data", s.length)
        rows: list[Row] = []
        for number, part in parts.items():
            selected = [name for name in part.rows if name in wanted]
            if selected:
                rows += run_part(number, part, selected, s, manifest)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"\ngpu_check on {device} ({'quick' if args.quick else 'full'}): torch {torch.__version__}")
    width = max(len(r.name) for r in rows)
    for r in rows:
        print(f"{r.name:<{width}}  {r.verdict}  {r.seconds:6.1f} s  {r.numbers}")
    return 0 if all(r.ok is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
