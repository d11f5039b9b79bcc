"""Checkpoint cost: bytes per save over DP sizes, and the training stall per save, synchronous vs asynchronous.

    python benchmarks/bench_checkpoint.py [--hidden 256] [--blocks 4] [--dp 1 2 4] [--steps 12]

* Bytes: the same model and ZeRO stage saved by DP 1, 2 and 4 ranks (local gloo processes); the EMA
  is sharded over DP, so the total stays flat. "EMA per rank" is what the previous format wrote
  (a whole EMA copy on every DP rank), computed from the measured EMA bytes.
* Stall: one process trains `--steps` steps and saves every 4; the stall of a save is the time the
  training loop spends inside `Trainer.save` (snapshot to host memory; plus the write when synchronous).
  With async saves the write overlaps the next steps; on this 2-core CPU the writer thread also competes
  with them for the cores, which the "steps with a save in flight" column shows.
* Offline conversion: a checkpoint saved by a world of 8 (TP2 x PP2 x DP2) consolidated in one fresh
  process (`convert.consolidate`, EMA weights): wall time and peak RSS, beside the RSS after the imports
  and the bytes of the model state produced.
* The computed 7B figure: TP4 x PP4 x DP64 (1,024 GPUs), bf16 weights with fp32 masters and Adam moments.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sedd_scale.testing.spawn import launch


def recipe(run: str, hidden: int, blocks: int, async_save: bool, save_every: int) -> dict:
    """A GPT-2-vocabulary model of `hidden` x `blocks` on synthetic tokens (ZeRO-1)."""
    return {"model": {"hidden_size": hidden, "n_heads": 4, "n_blocks": blocks, "cond_dim": 64, "num_tokens": 50257,
                      "length": 64, "dropout": 0.0},
            "data": {"manifests": ["unused.json"], "tokenizer": None, "seq_len": 64, "num_workers": 0},
            "optim": {"lr": 1e-3, "warmup": 1},
            "parallel": {"micro_batch": 2, "global_batch": 8, "zero_stage": 1},
            "train": {"steps": 1000, "save_every": save_every, "keep_last": 1, "async_save": async_save,
                      "eval_every": 10**6, "log_every": 10**6},
            "checkpoint": {"dir": run}}


def _trainer(data: dict):
    import sedd_scale.compat  # noqa: F401  (before megatron-core / DeepSpeed)

    from megatron.core import parallel_state as ps

    from sedd_scale.config import Recipe, from_dict
    from sedd_scale.distributed import engine
    from sedd_scale.testing.synthetic import SyntheticTokens
    from sedd_scale.train.trainer import Trainer

    r = from_dict(Recipe, copy.deepcopy(data))
    layout, topology = engine.setup(r)
    return Trainer(r, layout, topology,
                   loader=SyntheticTokens(r.model.num_tokens, r.data.seq_len, layout, ps.get_data_parallel_rank()))


def save_bytes(data: dict) -> dict:
    """Train one step, save synchronously; the step's total bytes and this rank's EMA bytes."""
    from sedd_scale.checkpoint.sharded import read_meta
    from sedd_scale.distributed import parallel

    trainer = _trainer(data)
    trainer.fit(max_steps=1)
    meta = read_meta(trainer.checkpoints.latest())
    ema = trainer.ema.shadow.numel() * 4
    parallel.destroy_parallel()
    return {"bytes": meta["bytes"], "ema_bytes": ema, "params": trainer.model_cfg.num_params(1)}


def stalls(data: dict, steps: int) -> dict:
    """Per-step times and the seconds each save held the loop up."""
    from sedd_scale.distributed import parallel

    trainer = _trainer(data)
    trainer.fit(max_steps=1)  # warm-up: engine, allocator, first save
    held, step_times, in_flight = [], [], []
    started_all = time.perf_counter()
    for _ in range(steps):
        started = time.perf_counter()
        trainer.train_step()
        step_times.append(time.perf_counter() - started)
        (in_flight if trainer.saver.busy() else []).append(step_times[-1])
        stop, writing, failed, _ = trainer._status()  # (no metrics here)
        if trainer.saver.pending is not None and not writing:
            trainer.saver.finish(failed)
        if trainer.step % data["train"]["save_every"] == 0:
            held.append(trainer.save())
    trainer.saver.wait()
    total = time.perf_counter() - started_all
    parallel.destroy_parallel()
    return {"held": held, "step": statistics.median(step_times), "in_flight": in_flight, "total": total}


_CONSOLIDATE = """
import json, resource, sys, time
from sedd_scale.apps import convert
imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
start = time.perf_counter()
convert.consolidate(sys.argv[1], sys.argv[2], weights="ema")
print(json.dumps({"seconds": time.perf_counter() - start, "imports": imports,
                  "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def offline_conversion(tmp: str, hidden: int, blocks: int) -> str:
    """Save with a world of 8 (TP2 x PP2 x DP2), consolidate in one fresh process; one line of results."""
    import json
    import subprocess

    data = recipe(f"{tmp}/w8", hidden, blocks, False, 1)
    data["parallel"].update(tp=2, pp=2)
    launch(save_bytes, 8, data, timeout=1800)
    out = Path(tmp) / "consolidated"
    proc = subprocess.run([sys.executable, "-c", _CONSOLIDATE, f"{tmp}/w8", str(out)], capture_output=True, text=True,
                          check=True)
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    state = sum(f.stat().st_size for f in out.iterdir() if f.suffix == ".safetensors")
    return (f"consolidate TP2 x PP2 x DP2 (8 ranks) in one process: {r['seconds']:.1f} s, peak RSS "
            f"{r['peak'] / 2**20:.0f} MiB = {r['imports'] / 2**20:.0f} MiB after imports + "
            f"{(r['peak'] - r['imports']) / 2**20:.0f} MiB, for a model state of {state / 2**20:.0f} MiB")


def main() -> None:
    """Measure and print the tables."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--dp", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--steps", type=int, default=12)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(f"model: hidden {args.hidden} x {args.blocks} blocks, GPT-2 vocabulary, ZeRO-1, fp32")
        print(f"{'DP':>3} {'bytes/save':>12} {'vs DP1':>7} {'EMA per rank (old format)':>26} {'vs DP1':>7}")
        base = None
        for dp in args.dp:
            out = launch(save_bytes, dp, recipe(f"{tmp}/dp{dp}", args.hidden, args.blocks, False, 1), timeout=1800)[0]
            old = out["bytes"] + (dp - 1) * out["ema_bytes"] * dp  # every rank wrote the whole EMA
            base = base or out["bytes"]
            print(f"{dp:>3} {out['bytes'] / 2**20:>10.1f}Mi {out['bytes'] / base:>7.3f} "
                  f"{old / 2**20:>24.1f}Mi {old / base:>7.3f}")
        print(f"\nstall per save, one process, {args.steps} steps, a save every 4")
        print(f"{'mode':>6} {'held per save (s)':>18} {'median step (s)':>16} {'steps with a write in flight (s)':>33}"
              f" {'steps + saves, total (s)':>25}")
        for mode in ("sync", "async"):
            out = launch(stalls, 1, recipe(f"{tmp}/{mode}", args.hidden, args.blocks, mode == "async", 4),
                         args.steps, timeout=1800)[0]
            flight = statistics.median(out["in_flight"]) if out["in_flight"] else float("nan")
            print(f"{mode:>6} {statistics.median(out['held']):>18.3f} {out['step']:>16.3f} {flight:>33.3f}"
                  f" {out['total']:>25.1f}")
        print("\n" + offline_conversion(tmp, args.hidden, args.blocks))
    params, dp, psi = 6_957_692_242, 64, 6_957_692_242 / 16  # 7B over TP4 x PP4: parameters per model shard
    weights, optimizer, ema = 2 * params, 12 * params, 4 * params
    print(f"\n7B at 1,024 GPUs (TP4 x PP4 x DP64), bytes per save: bf16 weights {weights / 1e9:.0f} GB + fp32 "
          f"masters and Adam moments {optimizer / 1e9:.0f} GB + EMA {ema / 1e9:.0f} GB = "
          f"{(weights + optimizer + ema) / 1e9:.0f} GB; with an EMA copy per DP rank it was "
          f"{(weights + optimizer + ema * dp) / 1e12:.2f} TB. Per GPU the EMA is {4 * psi / dp / 1e6:.0f} MB "
          f"(was {4 * psi / 1e9:.2f} GB).")


if __name__ == "__main__":
    main()
