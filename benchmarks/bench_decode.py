"""Quality per network evaluation: every registered sampler at several step budgets on enumerable distributions.

    python benchmarks/bench_decode.py                  # 3 tokens x 4 positions, 100,000 samples, steps 1..128
    python benchmarks/bench_decode.py --quick          # a smoke run (seconds): 4,000 samples, two budgets
    python benchmarks/bench_decode.py --checkpoint DIR --length 128   # adds a trained model's unigram entropy

Quality is the total variation between the sampled sequences' empirical law and the exact data law p0
(`sedd_scale.testing.exact`: the score is the exact concrete score of p0 noised by the absorbing graph,
computed by matrix exponentials and full enumeration). `floor` is the TV of as many i.i.d. draws from p0
itself: the best any sampler can show at that sample size. NFE is the network evaluations per sequence
the sampler made (its `NFECounter`); tokens/s is wall clock with the oracle as the "network" (cheap
here, so it measures the sampler's own overhead, not a model's; never a reported figure on a busy
machine). The headline is the fewest NFE of any row whose TV is within 10% of the exact analytic
sampler's at 128 steps (or the largest budget run).

The confidence and block samplers are biased where their docstrings say so (several positions revealed
in one step); the table shows by how much on these distributions, which are dense (Dirichlet 0.7 over
all 81 sequences), so positions depend on each other: a worst case for parallel decoding.

With --checkpoint (a hub or consolidated directory; CPU, TP=1) each sampler also draws --model-samples
sequences of --length tokens from the model and the table adds their mean unigram entropy (nats), NFE
and the judge: the model's own ELBO of its samples (nats/token, --judge-draws noise levels each; `self-ELBO`).
There is no exact law there, so no TV. Samples drawn exactly from the model p have E[-log p(x)] = H(p),
about the model's ELBO on held-out data when it fits the data (printed above the table); a sampler far
below that draws degenerate, repetitive text (read it with the unigram entropy), one far above draws text
the model finds unlikely (a biased parallel decoder's typical failure).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sedd_scale.diffusion import get_graph, get_noise
from sedd_scale.diffusion.elbo import elbo_per_sequence
from sedd_scale.diffusion.samplers import parse_sampler
from sedd_scale.diffusion.sampling import unigram_entropy
from sedd_scale.testing.exact import Enumerated, random_joint, total_variation

SAMPLERS = ["analytic", "euler", "cached", "confidence", "confidence:threshold=0.9", "confidence:threshold=0.7",
            "confidence:top_k=2", "block:size=2", "block:size=2,inner=cached", "block:size=2,inner=confidence",
            "block:size=1,inner=confidence"]
STEPS = [1, 2, 4, 8, 16, 32, 64, 128]
REFERENCE = "analytic"


def floor_tv(p0: torch.Tensor, samples: int, seed: int) -> float:
    """TV of `samples` i.i.d. draws from p0 itself."""
    flat = torch.multinomial(p0.reshape(-1), samples, replacement=True, generator=torch.Generator().manual_seed(seed))
    n, d = p0.shape[0], p0.dim()
    digits = torch.stack([(flat // n ** (d - 1 - i)) % n for i in range(d)], -1)
    return total_variation(digits, p0)


def run_enumerable(args) -> list[dict]:
    """One row per (sampler, steps) on the enumerable distribution."""
    p0 = random_joint(args.tokens, args.positions, seed=args.seed)
    enum = Enumerated("absorb", p0)
    graph, noise = get_graph("absorb", args.tokens), get_noise("loglinear")
    fn = enum.log_score_fn()
    rows = []
    for spec in args.samplers:
        sampler = parse_sampler(spec)
        for steps in args.steps:
            gen = torch.Generator().manual_seed(args.seed * 1000 + steps)
            start = time.perf_counter()
            drawn = sampler(fn, graph, noise, (args.samples, args.positions), steps=steps, generator=gen)
            seconds = time.perf_counter() - start
            rows.append({"sampler": spec, "steps": steps, "nfe": drawn.nfe,
                         "tok_s": args.samples * args.positions / seconds,
                         "tv": total_variation(drawn.tokens, p0)})
            print_row(rows[-1], header=len(rows) == 1)
    return rows


def print_row(row: dict, *, header: bool) -> None:
    """One table line (and the header before the first)."""
    if header:
        print(f"{'sampler':<34} {'steps':>5} {'NFE':>7} {'tokens/s':>10} {'TV':>7}  {'entropy':>8}  {'self-ELBO':>9}")
    tv = f"{row['tv']:7.4f}" if "tv" in row else f"{'-':>7}"
    entropy = f"{row['entropy']:8.4f}" if "entropy" in row else f"{'-':>8}"
    judge = f"{row['judge']:9.4f}" if "judge" in row else f"{'-':>9}"
    print(f"{row['sampler']:<34} {row['steps']:>5} {row['nfe']:7.2f} {row['tok_s']:10.0f} {tv}  {entropy}  {judge}",
          flush=True)


def headline(rows: list[dict]) -> str:
    """The fewest NFE of any row within 10% of the exact reference sampler's TV at its largest budget."""
    ref = max((r for r in rows if r["sampler"] == REFERENCE), key=lambda r: r["steps"])
    good = [r for r in rows if r["tv"] <= 1.1 * ref["tv"]]
    best = min(good, key=lambda r: (r["nfe"], r["tv"]))
    return (f"headline: {best['sampler']} at {best['steps']} steps reaches TV {best['tv']:.4f} with {best['nfe']:.2f} "
            f"NFE, within 10% of the exact {REFERENCE} sampler's {ref['tv']:.4f} at {ref['steps']} steps "
            f"({ref['nfe']:.0f} NFE): {ref['nfe'] / best['nfe']:.1f}x fewer evaluations")


def _held_out_elbo(path: Path) -> str:
    """The model's last validation ELBO as its model card records it (consolidated exports of a run)."""
    config = json.loads((path / "config.json").read_text())
    last = config.get("last_validation") if isinstance(config, dict) else None
    return f"{last['elbo_nats_per_token']:.4f} nats/token (step {last['step']})" if last else "not recorded"


def run_checkpoint(args) -> None:
    """Every sampler on a trained model (CPU, TP=1): NFE, tokens/s, the samples' unigram entropy and self-ELBO."""
    import sedd_scale.compat  # noqa: F401  (before megatron-core)

    import torch.distributed as dist

    from sedd_scale.apps.generation import model_log_score_fn
    from sedd_scale.distributed import parallel
    from sedd_scale.pretrained import load_pretrained

    created = not dist.is_initialized()
    parallel.init_model_parallel(1)
    try:
        model, graph, noise = load_pretrained(args.checkpoint, device="cpu")
        length = args.length or model.config.length
        specs = [s for s in args.samplers if graph.absorb or parse_sampler(s).graphs != ("absorb",)]
        held_out = _held_out_elbo(Path(args.checkpoint))
        print(f"\n{args.checkpoint}: {args.model_samples} samples x {length} tokens; the model's ELBO on held-out "
              f"data: {held_out}")
        for i, spec in enumerate(specs):
            for steps in args.model_steps:
                gen = torch.Generator().manual_seed(steps)
                start = time.perf_counter()
                drawn = parse_sampler(spec)(model_log_score_fn(model), graph, noise, (args.model_samples, length),
                                            steps=steps, generator=gen)
                seconds = time.perf_counter() - start
                bound, _ = elbo_per_sequence(model_log_score_fn(model), graph, noise, drawn.tokens,
                                             num_samples=args.judge_draws, generator=torch.Generator().manual_seed(0))
                print_row({"sampler": spec, "steps": steps, "nfe": drawn.nfe,
                           "tok_s": drawn.tokens.numel() / seconds,
                           "entropy": float(unigram_entropy(drawn.tokens).mean()),
                           "judge": float(bound.mean()) / length},
                          header=i == 0 and steps == args.model_steps[0])
    finally:
        if created:
            parallel.destroy_parallel()
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    """Print the enumerable table and its headline (and the checkpoint's table with --checkpoint)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=100_000)
    p.add_argument("--tokens", type=int, default=3, help="real tokens of the enumerable distribution")
    p.add_argument("--positions", type=int, default=4, help="its sequence length")
    p.add_argument("--steps", type=int, nargs="+", default=STEPS)
    p.add_argument("--samplers", nargs="+", default=SAMPLERS)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--quick", action="store_true", help="4,000 samples at 2 and 8 steps (a smoke run)")
    p.add_argument("--checkpoint", help="also sample this model (hub or consolidated directory)")
    p.add_argument("--length", type=int, help="tokens per model sample (default: the model's length)")
    p.add_argument("--model-samples", type=int, default=8)
    p.add_argument("--model-steps", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--judge-draws", type=int, default=4, help="noise levels of the self-ELBO per sample")
    args = p.parse_args(argv)
    if args.quick:
        args.samples, args.steps, args.model_steps = 4000, [2, 8], [4]
    floor = floor_tv(random_joint(args.tokens, args.positions, seed=args.seed), args.samples, 0)
    print(f"absorbing graph, {args.tokens} tokens x {args.positions} positions (Dirichlet 0.7 joint, seed {args.seed}),"
          f" {args.samples} samples; floor (i.i.d. draws from the truth): TV {floor:.4f}")
    rows = run_enumerable(args)
    if any(r["sampler"] == REFERENCE for r in rows):
        print(headline(rows))
    if args.checkpoint:
        run_checkpoint(args)


if __name__ == "__main__":
    main()
