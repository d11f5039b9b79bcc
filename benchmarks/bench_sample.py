"""The sampler's own cost per step against a reference-style step, and end-to-end sampling tokens/s.

    python benchmarks/bench_sample.py                      # absorb + uniform, B4 x L128 and B1 x L1024, V 50258
    python benchmarks/bench_sample.py --steps 8 --e2e-steps 8 --shapes 4x128     # quick

Reference-style step (the public SEDD code's method, written here from sedd-math 5): s = exp(log-score)
in float32, w = staggered_score(s) * transp_transition(x) in float32 over the whole (B, L, V) tensor, and
the draw argmax_y w_y / (1e-10 - log(u_y + 1e-10)) with u a float32 uniform of shape (B, L, V). (Its
transp_transition is built by expand + scatter, cheaper than a one-hot, so the ratio is conservative.)
Ours: `sedd_scale.diffusion.analytic_step` (float64 weights at the positions that can move, float64
inverse CDF, one float64 uniform per position).

Per-step cost excludes the model: both step functions get a stand-in log-score function (fixed random
logits, normalised like exact absorbing scores so the MASK fraction follows the schedule), and the time
spent inside it is subtracted. Both run on the same states, interleaved step by step along one analytic
trajectory of --steps steps (ours drives it), each step the best of --repeats tries (robust to other
load on the machine). For absorb the first step (everything MASK, the most positions to draw) is shown
apart from the trajectory mean. End to end: `generation.generate_batches` (what tools/sample.py runs;
analytic predictor, --e2e-steps steps, final denoise) on a random tiny SEDD (hidden 128, 4 blocks,
GPT-2 vocabulary), with our sampler and with the reference-style one, best of --e2e-repeats
interleaved runs. Timings are wall clock on whatever else the machine runs.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sedd_scale.diffusion import analytic_step, get_graph, get_noise
from sedd_scale.diffusion.graph import Graph

NUM_TOKENS = 50257  # GPT-2: absorb has V = 50258 states (MASK last), uniform 50257


# ---------------------------------------------------------------------------------------------
# The reference-style step, float32 throughout (sedd-math 5)
def reference_weights(graph: Graph, score: Tensor, x: Tensor, dsigma: Tensor) -> Tensor:
    """w_y = [exp(-ds Q) s]_y exp(ds Q)[x, y] in float32, the closed forms of sedd-math 5 on the full tensor."""
    ds = dsigma.float()[:, None, None]
    g, stay = ds.exp(), (-ds).exp()
    if graph.absorb:
        staggered = score * g
        staggered[..., -1] = score[..., -1] - (g[..., 0] - 1) * score[..., :-1].sum(-1)
        is_mask = (x == graph.mask).unsqueeze(-1)
        transp = torch.where(is_mask, 1 - stay, 0.0).expand_as(score).clone()
        transp[..., -1] = is_mask[..., 0].float()
        transp.scatter_(-1, x.unsqueeze(-1), torch.where(is_mask, 1.0, stay.expand_as(is_mask)))
    else:
        n = graph.dim
        staggered = score * g - (g - 1) / n * score.sum(-1, keepdim=True)
        transp = ((1 - stay) / n).expand_as(score).clone()
        transp.scatter_add_(-1, x.unsqueeze(-1), stay.expand(*x.shape, 1))
    return staggered * transp


def reference_draw(weights: Tensor, generator: torch.Generator) -> Tensor:
    """The float32 exponential race over every entry."""
    u = torch.rand(weights.shape, generator=generator)
    return (weights / (1e-10 - (u + 1e-10).log())).argmax(-1)


def reference_step(log_score_fn, graph: Graph, noise, x: Tensor, t: Tensor, dt: float, generator,
                   denoise: bool = False) -> Tensor:
    """One analytic step (or the final denoise) the reference way."""
    total = noise.total_noise(t)
    dsigma = total if denoise else total - noise.total_noise(t - dt)
    weights = reference_weights(graph, log_score_fn(x, total)[..., : graph.dim].float().exp(), x, dsigma)
    if denoise and graph.absorb:
        weights[..., graph.mask] = 0.0
    return reference_draw(weights, generator)


def reference_sample(log_score_fn, graph: Graph, noise, shape: tuple[int, int], steps: int, eps: float,
                     generator) -> Tensor:
    """The reference's analytic sampler loop with the final denoiser."""
    x = graph.sample_limit(*shape, generator=generator)
    grid = torch.linspace(1.0, eps, steps + 1, dtype=torch.float64)
    for k in range(steps):
        x = reference_step(log_score_fn, graph, noise, x, grid[k].expand(shape[0]), (1 - eps) / steps, generator)
    return reference_step(log_score_fn, graph, noise, x, grid[-1].expand(shape[0]), 0.0, generator, denoise=True)


# ---------------------------------------------------------------------------------------------
class StandIn:
    """A cheap log-score function with exact-score normalisation; `seconds` accumulates the time spent in it."""

    def __init__(self, graph: Graph, batch: int, length: int, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        logits = torch.randn(batch, length, graph.dim, generator=gen) * 2
        self.graph, self.seconds = graph, 0.0
        if graph.absorb:  # sum over real tokens of s = 1 / (e^sigma - 1) at masked positions, s_MASK = 1
            logits[..., -1] = float("-inf")
            self.base = logits - torch.logsumexp(logits, -1, keepdim=True)
        else:
            self.base = logits

    def __call__(self, x: Tensor, total: Tensor) -> Tensor:
        start = time.perf_counter()
        out = self.base.clone()
        if self.graph.absorb:
            out -= torch.log(torch.expm1(total.float()))[:, None, None]
        out.scatter_(-1, x.unsqueeze(-1), 0.0)  # log s_x = 0, as the model's parametrisation gives
        self.seconds += time.perf_counter() - start
        return out


def _copy(gen: torch.Generator) -> torch.Generator:
    return torch.Generator().set_state(gen.get_state())


def per_step(graph: Graph, noise, batch: int, length: int, steps: int, repeats: int, eps: float = 1e-5) -> dict:
    """Sampler-only seconds per analytic step: reference-style and ours on the same states, interleaved, each the
    best of `repeats` tries (copies of the generators, so the trajectory is the same for any `repeats`)."""
    fn = StandIn(graph, batch, length)
    gen_ref, gen_ours = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    x = graph.sample_limit(batch, length, generator=gen_ours)
    grid = torch.linspace(1.0, eps, steps + 1, dtype=torch.float64)
    dt = (1 - eps) / steps
    ref, ours, masked = [], [], []
    for k in range(steps):
        t = grid[k].expand(batch)
        masked.append(float((x == graph.mask).double().mean()) if graph.absorb else 1.0)
        best = {"ref": float("inf"), "ours": float("inf")}
        for attempt in range(repeats):
            last = attempt == repeats - 1
            for side in ("ref", "ours"):
                fn.seconds = 0.0
                start = time.perf_counter()
                if side == "ref":
                    reference_step(fn, graph, noise, x, t, dt, _copy(gen_ref))
                else:
                    out = analytic_step(fn, graph, noise, x, t, dt, gen_ours if last else _copy(gen_ours))
                best[side] = min(best[side], time.perf_counter() - start - fn.seconds)
        x = out
        ref.append(best["ref"])
        ours.append(best["ours"])
    return {"ref": sum(ref) / steps, "ours": sum(ours) / steps, "ref_first": ref[0], "ours_first": ours[0],
            "masked_mean": sum(masked) / steps}


def end_to_end(kind: str, batch: int, length: int, steps: int, repeats: int, seed: int = 0, device: str = "cpu",
               reference: bool = True, size: str = "tiny") -> dict:
    """Tokens/s of tools/sample.py's sampling (generate_batches, analytic, denoise) on a random SEDD of preset `size`
    on `device`; each sampler the best of `repeats` runs, interleaved (`reference`: also the reference-style one,
    CPU only)."""
    from sedd_scale.apps.generation import generate_batches, model_log_score_fn
    from sedd_scale.distributed import parallel  # megatron-core from here on
    from sedd_scale.model.config import preset
    from sedd_scale.model.transformer import SEDD

    parallel.init_model_parallel(1, seed=seed)
    cfg = preset(size, graph=kind, num_tokens=NUM_TOKENS, length=length, dropout=0.0, vocab_multiple=1,
                 compile=False)  # one eager model serves both samplers
    model = SEDD(cfg, device=device).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen).to(p.device) * 0.02)
    graph, noise = get_graph(kind, NUM_TOKENS), get_noise("loglinear" if kind == "absorb" else "geometric")
    log_score = model_log_score_fn(model)
    out = {"ref": 0.0, "ours": 0.0, "forward_s": float("inf")}
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            log_score(torch.zeros(batch, length, dtype=torch.long, device=device), torch.ones(batch, device=device))
            _sync(device)
            out["forward_s"] = min(out["forward_s"], time.perf_counter() - start)
            if reference:
                start = time.perf_counter()
                reference_sample(log_score, graph, noise, (batch, length), steps, 1e-5,
                                 torch.Generator().manual_seed(seed))
                out["ref"] = max(out["ref"], batch * length / (time.perf_counter() - start))
            start = time.perf_counter()
            generate_batches(log_score, graph, noise, plan=[(0, batch)], length=length, steps=steps,
                             predictor="analytic", seed=seed, device=device)  # returns CPU ids: synchronised
            out["ours"] = max(out["ours"], batch * length / (time.perf_counter() - start))
    parallel.destroy_parallel()
    return out


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    """Measure every graph x shape and print the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["4x128", "1x1024"], help="BxL")
    p.add_argument("--graphs", nargs="+", default=["absorb", "uniform"])
    p.add_argument("--steps", type=int, default=16, help="analytic steps of the per-step trajectory")
    p.add_argument("--e2e-steps", type=int, default=32, help="sampler steps end to end (0: skip)")
    p.add_argument("--repeats", type=int, default=3, help="tries per measured step (the best counts)")
    p.add_argument("--e2e-repeats", type=int, default=2, help="end-to-end runs per sampler (the best counts)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for kind in args.graphs:
        graph = get_graph(kind, NUM_TOKENS)
        noise = get_noise("loglinear" if kind == "absorb" else "geometric")
        for shape in args.shapes:
            batch, length = (int(v) for v in shape.split("x"))
            step = per_step(graph, noise, batch, length, args.steps, args.repeats)
            e2e = end_to_end(kind, batch, length, args.e2e_steps, args.e2e_repeats) if args.e2e_steps else None
            rows.append((kind, graph.dim, shape, step, e2e))
            print_row(*rows[-1], header=len(rows) == 1, steps=args.steps, e2e_steps=args.e2e_steps)


def print_row(kind, dim, shape, step, e2e, *, header: bool, steps: int, e2e_steps: int) -> None:
    """One line of the table (the header first)."""
    if header:
        print(f"sampler-only s/step (best of tries) over a {steps}-step analytic trajectory (first step: all MASK "
              f"under absorb); end to end: tiny SEDD, {e2e_steps} analytic steps + denoise; "
              f"{torch.get_num_threads()} threads")
        print(f"{'graph':<8} {'V':>6} {'shape':>7} | {'ref s/step':>10} {'ours s/step':>11} {'ratio':>6} | "
              f"{'ref first':>9} {'ours first':>10} {'ratio':>6} | {'masked':>6} | {'ref tok/s':>9} "
              f"{'ours tok/s':>10} {'speedup':>7} {'fwd s':>6}")
    line = (f"{kind:<8} {dim:>6} {shape:>7} | {step['ref']:>10.4f} {step['ours']:>11.4f} "
            f"{step['ours'] / step['ref']:>6.3f} | {step['ref_first']:>9.4f} {step['ours_first']:>10.4f} "
            f"{step['ours_first'] / step['ref_first']:>6.3f} | {step['masked_mean']:>6.2f} |")
    if e2e:
        line += f" {e2e['ref']:>9.1f} {e2e['ours']:>10.1f} {e2e['ours'] / e2e['ref']:>7.2f} {e2e['forward_s']:>6.3f}"
    print(line, flush=True)


if __name__ == "__main__":
    main()
