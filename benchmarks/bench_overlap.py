"""A data-parallel training step with ZeRO's gradient reduction overlapped with the backward, and without.

    python benchmarks/bench_overlap.py                       # tiny model, ZeRO-1 and 2, DP2 (a couple of minutes)
    python benchmarks/bench_overlap.py --model small --rounds 4
    python benchmarks/bench_overlap.py --bucket 200000000    # the recipe's default buckets

Two gloo ranks on this machine (DP2) train the same model with `Trainer.train_step()` (the DeepSpeed engine,
megatron-core layers, the fused loss, AdamW, the EMA) under ZeRO-1 and ZeRO-2, with `parallel.zero_overlap_comm`
off and on; every other key is the same. The four trainers are built in one launch, from the same seed, and
their steps are interleaved round by round (off, on, off, on, ...) so that load from other processes hits them
alike; the table shows the median seconds per step after `--warmup` rounds, and checks that overlap changed no
loss (the first steps' losses must be equal, see tests/test_zero_overlap.py for the bitwise check of weights).

What to expect on CPU: DeepSpeed runs no side stream on a synchronized device (CPU), so "overlap" there only
reorders the work: ZeRO-1 reduces its buckets inside the last micro-batch's backward instead of after it, and
both stages alternate two buckets. The times are close; the gain from overlap needs CUDA streams (NCCL
overlapping the kernels), which the planner models (`plan/speed.py:dp_exchange`). The buckets are lowered to
`--bucket` elements so that the tiny model's gradients span several of them. The machine may be shared: the
timings are indicative only.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sedd_scale.testing.spawn import launch  # noqa: E402

MODELS = {  # cpu-tiny's dims; "small" is four times as wide, the cost of a step dominated by the matmuls
    "tiny": {"hidden_size": 128, "n_heads": 4, "n_blocks": 4, "cond_dim": 64},
    "small": {"hidden_size": 256, "n_heads": 4, "n_blocks": 4, "cond_dim": 64},
}
CASES = [(zero, overlap) for zero in (1, 2) for overlap in (False, True)]


def recipe(model: str, zero: int, overlap: bool, bucket: int, seq_len: int, micro: int, run: str) -> dict:
    """A raw recipe of `model` on synthetic byte tokens, DP2 with two micro-batches per rank per step."""
    return {"model": {**MODELS[model], "num_tokens": 257, "length": seq_len, "dropout": 0.0, "vocab_multiple": 1},
            "data": {"manifests": ["unused.json"], "tokenizer": None, "seq_len": seq_len, "num_workers": 0},
            "optim": {"lr": 1e-3, "warmup": 1},
            "parallel": {"micro_batch": micro, "global_batch": 4 * micro, "zero_stage": zero,
                         "zero_overlap_comm": overlap, "zero_reduce_bucket_size": bucket},
            "train": {"steps": 1000, "eval_every": 10**6, "log_every": 10**6, "save_every": 10**6,
                      "async_save": False},
            "checkpoint": {"dir": run}}


def timed_steps(args: dict) -> dict:
    """On each rank: build a trainer per case (one process-group setup), step them in interleaved rounds; return
    each case's per-step seconds (the slower rank's, as the step ends on all ranks together) and first losses."""
    import sedd_scale.compat  # noqa: F401  (before megatron-core / DeepSpeed)

    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from sedd_scale.config import Recipe, from_dict
    from sedd_scale.distributed import engine, parallel
    from sedd_scale.testing.synthetic import SyntheticTokens
    from sedd_scale.train.trainer import Trainer

    trainers = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for i, (zero, overlap) in enumerate(CASES):
                r = from_dict(Recipe, recipe(args["model"], zero, overlap, args["bucket"], args["seq_len"],
                                             args["micro"], f"{tmp}/{i}"))
                if not trainers:
                    layout, topology = engine.setup(r)  # the groups do not depend on the ZeRO stage
                layout = r.layout(dist.get_world_size())
                loader = SyntheticTokens(r.model.num_tokens, r.data.seq_len, layout, ps.get_data_parallel_rank())
                trainers[(zero, overlap)] = Trainer(r, layout, topology, loader=loader)
            seconds: dict = {case: [] for case in CASES}
            losses: dict = {case: [] for case in CASES}
            for round_ in range(args["warmup"] + args["rounds"]):
                for case, trainer in trainers.items():
                    dist.barrier()
                    start = time.perf_counter()
                    loss = trainer.train_step()
                    dist.barrier()
                    if round_ < 2:
                        losses[case].append(loss)
                    if round_ >= args["warmup"]:
                        seconds[case].append(time.perf_counter() - start)
            for trainer in trainers.values():
                trainer.saver.close()
            return {"seconds": seconds, "losses": losses}
        finally:
            trainers.clear()
            parallel.destroy_parallel()


def table(result: dict, args: argparse.Namespace) -> list[str]:
    """The median step per case and the on/off ratio."""
    rows = [f"DP2 gloo, {args.model} model ({MODELS[args.model]['hidden_size']} x {MODELS[args.model]['n_blocks']} "
            f"blocks), micro {args.micro} x {args.seq_len} tokens, 2 micro-batches per rank, reduce buckets of "
            f"{args.bucket:,} elements, median of {args.rounds} rounds after {args.warmup}",
            f"{'ZeRO':>4} | {'overlap off s':>13} | {'overlap on s':>12} | {'on / off':>8} | losses equal"]
    for zero in (1, 2):
        off, on = (statistics.median(result["seconds"][(zero, o)]) for o in (False, True))
        same = result["losses"][(zero, False)] == result["losses"][(zero, True)]
        rows.append(f"{zero:>4} | {off:>13.4f} | {on:>12.4f} | {on / off:>8.3f} | {'yes' if same else 'NO'}")
    return rows


def main(argv: list[str] | None = None) -> list[str]:
    """Run the benchmark, print the table and return its lines."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="tiny")
    p.add_argument("--rounds", type=int, default=8, help="measured rounds")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured rounds first")
    p.add_argument("--bucket", type=int, default=200_000, help="parallel.zero_reduce_bucket_size (elements)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro", type=int, default=4, help="sequences per micro-batch")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0:
        p.error("--rounds must be >= 1 and --warmup >= 0")
    spec = {"model": args.model, "bucket": args.bucket, "seq_len": args.seq_len, "micro": args.micro,
            "rounds": args.rounds, "warmup": args.warmup}
    ranks = launch(timed_steps, 2, spec, timeout=3600, threads=args.threads)
    # A step ends on both ranks at the second barrier: the slower rank's time is the step's.
    merged = {"seconds": {case: [max(ts) for ts in zip(*(r["seconds"][case] for r in ranks))] for case in CASES},
              "losses": ranks[0]["losses"]}
    rows = table(merged, args)
    print("\n".join(rows))
    return rows


if __name__ == "__main__":
    main()
