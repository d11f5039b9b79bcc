"""The training objectives side by side: the same tiny absorbing model, data, seed and steps under each
`diffusion.objective`, then its validation ELBO, step time and peak memory.

    python benchmarks/bench_objectives.py         # 300 steps each (about a minute per objective on 2 quiet cores)
    python benchmarks/bench_objectives.py --steps 2000 --valid-batches 16 --draws 16

The data is a Markov chain over N tokens (each next token is the previous one plus 1, 2 or 3 modulo N, with
probabilities 0.6 / 0.3 / 0.1; the first token uniform), so the true NLL per token is known and printed: the
ELBO bounds it from above. Each objective trains its own Trainer (one process, ZeRO-0, fp32, the same initial
weights up to the head's meaning) through `sedd_scale.train`: score_entropy on log-ratio outputs
(`model.parametrization: ratios`, `model.scale_by_sigma: true`), masked_ce on denoiser logits
(`parametrization: denoiser`, `scale_by_sigma: false`). The ELBO is `Trainer.validate` (the fused head loss of
the model's own objective, antithetic draws; raw weights, not the EMA) with its Monte-Carlo plus data standard
error. Samples (`train.sampler`, through the model's log-scores) are scored by the share of their transitions
the chain allows: a check that sampling reads each parametrization right. Step time is the median over the
steps after `--warmup`; peak memory the largest growth of the resident set over one step (bench_step.measure).
The machine may be shared: times are indicative.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

STEPS_PROBS = (0.6, 0.3, 0.1)  # P(next = previous + 1, + 2, + 3 mod N)
OBJECTIVES = {"score_entropy": {"parametrization": "ratios", "scale_by_sigma": True},
              "masked_ce": {"parametrization": "denoiser", "scale_by_sigma": False}}


def chain(count: int, length: int, num_tokens: int, gen: torch.Generator) -> torch.Tensor:
    """`count` sequences of the Markov chain."""
    first = torch.randint(0, num_tokens, (count, 1), generator=gen)
    moves = torch.multinomial(torch.tensor(STEPS_PROBS), count * (length - 1), replacement=True, generator=gen) + 1
    return (first + torch.cat([torch.zeros(count, 1, dtype=torch.long), moves.view(count, -1)], 1).cumsum(1)
            ) % num_tokens


def true_nll_per_token(length: int, num_tokens: int) -> float:
    """The chain's exact NLL per token: log N for the first, the step entropy for the others."""
    entropy = -sum(p * math.log(p) for p in STEPS_PROBS)
    return (math.log(num_tokens) + (length - 1) * entropy) / length


def allowed_share(samples: torch.Tensor, num_tokens: int) -> float:
    """The share of a sample's consecutive pairs that the chain allows (a step of 1, 2 or 3)."""
    step = (samples[:, 1:] - samples[:, :-1]) % num_tokens
    ok = (step >= 1) & (step <= len(STEPS_PROBS)) & (samples[:, 1:] < num_tokens) & (samples[:, :-1] < num_tokens)
    return float(ok.float().mean())


class ChainTokens:
    """The training stream: step s's batch drawn from (seed, s), the same for every objective."""

    def __init__(self, batch: int, length: int, num_tokens: int, seed: int = 0):
        self.batch, self.length, self.num_tokens, self.seed, self.count = batch, length, num_tokens, seed, 0

    def __iter__(self):
        while True:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + self.count)
            self.count += 1
            yield chain(self.batch, self.length, self.num_tokens, gen)

    def state_dict(self) -> dict:
        """The position in the stream."""
        return {"count": self.count}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()`'s position."""
        self.count = state["count"]


def build(objective: str, args, run_dir: str):
    """A one-process Trainer of the tiny model under `objective`."""
    from sedd_scale.config import Recipe, from_dict
    from sedd_scale.distributed import engine
    from sedd_scale.train.trainer import Trainer

    recipe = from_dict(Recipe, {
        "model": {"hidden_size": args.hidden, "n_heads": 4, "n_blocks": args.blocks, "cond_dim": 32,
                  "num_tokens": args.num_tokens, "graph": "absorb", "length": args.length, "vocab_multiple": 1,
                  "dropout": 0.0, **OBJECTIVES[objective]},
        "data": {"manifests": ["unused/manifest.json"], "tokenizer": None, "seq_len": args.length},
        "diffusion": {"noise": "loglinear", "objective": objective},
        "optim": {"lr": args.lr, "warmup": min(50, args.steps // 10), "schedule": "cosine", "min_lr": args.lr / 10},
        "parallel": {"zero_stage": 0, "micro_batch": args.batch, "global_batch": args.batch},
        "train": {"steps": args.steps, "ema": 0.99, "seed": args.seed},
        "checkpoint": {"dir": run_dir}})
    layout, topology = engine.setup(recipe)
    return Trainer(recipe, layout, topology, loader=ChainTokens(args.batch, args.length, args.num_tokens, args.seed))


def run(objective: str, args) -> dict:
    """Train, validate and sample one objective."""
    from bench_step import measure

    from sedd_scale.data.loader import EvalBatch
    from sedd_scale.distributed import parallel

    with tempfile.TemporaryDirectory(prefix="bench_objectives_") as run_dir:
        trainer = build(objective, args, run_dir)
        times, peaks = [], []
        for step in range(args.steps):
            wall, _, peak = measure(trainer.train_step)
            if step >= args.warmup:
                times.append(wall)
                peaks.append(peak)
        gen = torch.Generator().manual_seed(10_007)  # the same validation data for every objective
        batches = [EvalBatch(chain(args.batch, args.length, args.num_tokens, gen),
                             torch.ones(args.batch, dtype=torch.bool), i) for i in range(args.valid_batches)]
        result = trainer.validate(batches, args.draws, ema=False, seed=1)
        samples = trainer.samples(args.samples, args.sample_steps) if args.samples else None
        del trainer
        parallel.destroy_parallel()
    return {"objective": objective, "elbo": result.nats_per_token, "stderr": result.stderr,
            "step_ms": 1e3 * statistics.median(times) if times else float("nan"),
            "peak_mib": max(peaks) / 2**20 if peaks else float("nan"),
            "allowed": allowed_share(samples, args.num_tokens) if samples is not None else float("nan")}


def main(argv=None) -> list[dict]:
    """Parse flags, run every objective, print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--objectives", default=",".join(OBJECTIVES), help="comma list (default: all)")
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps per objective")
    ap.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    ap.add_argument("--batch", type=int, default=32, help="sequences per step (and per validation batch)")
    ap.add_argument("--length", type=int, default=32, help="sequence length")
    ap.add_argument("--num-tokens", type=int, default=32, help="vocabulary N")
    ap.add_argument("--hidden", type=int, default=64, help="model width")
    ap.add_argument("--blocks", type=int, default=2, help="transformer blocks")
    ap.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (cosine to lr / 10)")
    ap.add_argument("--valid-batches", type=int, default=8, help="validation batches")
    ap.add_argument("--draws", type=int, default=8, help="noise draws per validation sequence")
    ap.add_argument("--samples", type=int, default=32, help="sequences sampled per objective (0: none)")
    ap.add_argument("--sample-steps", type=int, default=32, help="sampler steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.objectives.split(",") if n.strip()]
    unknown = sorted(set(names) - set(OBJECTIVES))
    if unknown:
        ap.error(f"unknown objectives {unknown}; choose from {sorted(OBJECTIVES)}")
    rows = [run(name, args) for name in names]
    print(f"\n{args.steps} steps, batch {args.batch} x {args.length}, N = {args.num_tokens}, hidden {args.hidden} x "
          f"{args.blocks} blocks; true NLL {true_nll_per_token(args.length, args.num_tokens):.4f} nats/token")
    print(f"{'objective':<14} {'ELBO nats/tok':>14} {'stderr':>8} {'step ms':>8} {'peak MiB':>9} {'sample ok':>9}")
    for r in rows:
        print(f"{r['objective']:<14} {r['elbo']:>14.4f} {r['stderr']:>8.4f} {r['step_ms']:>8.1f} {r['peak_mib']:>9.1f} "
              f"{r['allowed']:>9.3f}")
    return rows


if __name__ == "__main__":
    main()
