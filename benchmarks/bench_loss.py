"""Head + score-entropy loss, fwd+bwd: naive (full logits, reference loss) vs fused chunked vocab-parallel.

    python benchmarks/bench_loss.py                                # both graphs, tokens 8x1024, H 768, V 50258
    python benchmarks/bench_loss.py --tokens 1024 --min-ratio 4    # quick run

Every row runs in fresh processes (TP=2: two ranks joined by gloo), so peaks do not mix. Peak memory is
the growth during one fwd+bwd step over what was allocated before it (hidden states, head parameters, ids):
on CUDA from the caching allocator (`torch.cuda.max_memory_allocated`), on CPU from the process's resident
set (the kernel's VmHWM high-water mark, reset through /proc/self/clear_refs before the step). Time is the
mean wall time of the measured steps after one warm-up step. The fused rows run eagerly (`compile=False`:
the chunk expressions uncompiled; `model.compile` would fuse them). Chunks hold the loss's default budget of
logits (`HeadLossConfig.chunk_bytes`) unless --chunk-size gives tokens.

The fused path's point is memory: every fused row must peak at least --min-ratio (default 10, for the default shape)
times below the naive row (and under --max-mib, when given). Fewer tokens shrink the naive row's logits but not the
head's weight gradient that both paths hold (V x H fp32: 147 MiB by default), so smaller runs need a smaller ratio.
The bound is printed in the table; a row past it makes the benchmark exit with status 1 and a message naming the
row, its peak and the bound (`peak_problems`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sedd_scale.diffusion import get_graph, get_noise, to_log_score
from sedd_scale.loss import HeadLossConfig, score_entropy_head, weighted_score_entropy_head

ROWS = (("naive", 1), ("fused per-token", 1), ("fused weighted", 1), ("fused weighted", 2))
MIN_RATIO = 10.0  # naive peak / fused peak, at least, for every fused row


def _rss_peak_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))


def _reset_peak(device: torch.device) -> int:
    """Reset the peak counter; return the current usage in bytes."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    return _rss_peak_kib() * 1024


def _peak(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _rss_peak_kib() * 1024


def _setup(args, tp: int, rank: int, device: torch.device):
    """Inputs of one training step: hidden states, this rank's head shard, noised ids, noise and rates."""
    g = torch.Generator().manual_seed(0)
    batch, length = args.batch, args.tokens // args.batch
    num_tokens = args.vocab - (args.graph == "absorb")
    v_pad = -(-args.vocab // (128 * tp)) * 128 * tp  # megatron pads to a multiple of 128 x TP
    vl = v_pad // tp
    dtype = getattr(torch, args.dtype)
    graph = get_graph(args.graph, num_tokens)
    noise = get_noise("loglinear" if args.graph == "absorb" else "geometric")
    t = 1e-3 + (1 - 1e-3) * torch.rand(batch, generator=g)
    sigma, rate = noise(t)
    x0 = torch.randint(0, num_tokens, (batch, length), generator=g)
    xt = graph.sample_transition(x0, sigma, generator=g)
    w = torch.randn(v_pad, args.hidden, generator=g) * 0.02
    b = torch.randn(v_pad, generator=g) * 0.02
    h = torch.randn(batch, length, args.hidden, generator=g)
    to = lambda x: x.to(device)  # noqa: E731
    return dict(
        graph=graph, hidden=to(h.to(dtype)).requires_grad_(True),
        weight=to(w[rank * vl:(rank + 1) * vl].to(dtype)).requires_grad_(True),
        bias=to(b[rank * vl:(rank + 1) * vl].to(dtype)).requires_grad_(True),
        x_t=to(xt), x_0=to(x0), sigma=to(sigma), rate=to(rate), batch=batch,
        cfg=HeadLossConfig.for_graph(args.graph, num_tokens, args.graph == "absorb", getattr(args, "chunk_size", None),
                                   compile=False))  # every row eager (the chunk expressions uncompiled)


def _step(kind: str, d: dict, group) -> None:
    """One fwd+bwd of head + loss (the loss is the batch mean of per-sequence sigma-weighted sums)."""
    h, w, b, cfg = d["hidden"], d["weight"], d["bias"], d["cfg"]
    if kind == "naive":
        gr = d["graph"]
        logits = torch.nn.functional.linear(h, w, b)
        ls = to_log_score(logits, d["x_t"], d["sigma"], num_tokens=cfg.objective.num_tokens, graph_dim=gr.dim,
                          scale_by_sigma=cfg.objective.scale_by_sigma)
        se = gr.score_entropy(ls[..., : gr.dim], d["sigma"], d["x_t"], d["x_0"])
        loss = (d["rate"][:, None] * se).sum() / d["batch"]
    elif kind == "fused per-token":
        se = score_entropy_head(h, w, b, d["x_t"], d["x_0"], d["sigma"], cfg, tp_group=group)
        loss = (d["rate"][:, None] * se).sum() / d["batch"]
    else:
        loss, _ = weighted_score_entropy_head(h, w, b, d["x_t"], d["x_0"], d["sigma"], d["rate"] / d["batch"],
                                              cfg, tp_group=group)
    loss.backward()
    for p in (h, w, b):
        p.grad = None


def _worker(rank: int, tp: int, kind: str, args, port: int, out_dir: str) -> None:
    device = torch.device(args.device)
    group = None
    if tp > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.set_num_threads(max(1, torch.get_num_threads() // tp))
        dist.init_process_group("gloo", rank=rank, world_size=tp)
        group = dist.group.WORLD
    d = _setup(args, tp, rank, device)
    _step(kind, d, group)  # warm-up
    base = _reset_peak(device)
    start = time.perf_counter()
    for _ in range(args.iters):
        _step(kind, d, group)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = (time.perf_counter() - start) / args.iters
    with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
        json.dump(dict(peak=_peak(device) - base, time=elapsed), f)
    if tp > 1:
        dist.destroy_process_group()


def run_row(kind: str, tp: int, args) -> dict:
    """Run one row in fresh processes; return the largest per-rank peak and the slowest rank's time."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(tp, kind, args, 29500 + os.getpid() % 1000, out_dir), nprocs=tp, join=True)
        ranks = [json.load(open(os.path.join(out_dir, f"{r}.json"))) for r in range(tp)]
    return dict(peak=max(r["peak"] for r in ranks), time=max(r["time"] for r in ranks))


def peak_bound(naive_peak: float | None, min_ratio: float, max_mib: float | None) -> float:
    """The largest peak (bytes) a fused row may reach: naive / min_ratio, and at most max_mib MiB when given."""
    bounds = [] if naive_peak is None else [naive_peak / min_ratio]
    if max_mib is not None:
        bounds.append(max_mib * 2**20)
    return min(bounds) if bounds else float("inf")


def peak_problems(graph: str, rows: list[tuple[str, int, dict]], bound: float) -> list[str]:
    """One line per fused row (kind, TP, result) whose peak exceeds `bound` bytes."""
    return [f"{graph}: {kind} TP{tp} peaked at {r['peak'] / 2**20:.0f} MiB per rank, over the bound of "
            f"{bound / 2**20:.0f} MiB" for kind, tp, r in rows if kind != "naive" and r["peak"] > bound]


def run_graph(args) -> list[str]:
    """Run every row of one graph, print its table; return the fused rows' peaks past the bound."""
    chunk = "the default logits budget" if args.chunk_size is None else f"{args.chunk_size} tokens"
    print(f"\ntokens {args.batch}x{args.tokens // args.batch}, H {args.hidden}, V {args.vocab}, graph {args.graph}, "
          f"chunk {chunk}, {args.dtype}, device {args.device}, threads {torch.get_num_threads()}, "
          f"peak = {'CUDA allocator' if args.device.startswith('cuda') else 'RSS high-water'} growth over the step; "
          f"fused rows eager (compile off)", flush=True)
    print("| path | TP | peak / rank (MiB) | naive peak / this | bound (MiB) | time (s) | time / naive |")
    print("|---|---|---|---|---|---|---|", flush=True)
    naive, done, bound = None, [], peak_bound(None, args.min_ratio, args.max_mib)
    for kind, tp in ROWS:  # rows print as they finish (naive first: the ratios' denominator and the bound)
        if kind == "naive" and args.no_naive:
            continue
        r = run_row(kind, tp, args)
        if kind == "naive":
            naive = r
            bound = peak_bound(r["peak"], args.min_ratio, args.max_mib)
        done.append((kind, tp, r))
        ratio = f"{naive['peak'] / max(r['peak'], 1):.1f}x" if naive else "-"
        speed = f"{r['time'] / naive['time']:.2f}" if naive else "-"
        limit = "-" if kind == "naive" or bound == float("inf") else f"{bound / 2**20:.0f}"
        print(f"| {kind} | {tp} | {r['peak'] / 2**20:.0f} | {ratio} | {limit} | {r['time']:.3f} | {speed} |",
              flush=True)
    return peak_problems(args.graph, done, bound)


def main() -> None:
    """Parse options, run every row of every graph, print the tables; exit 1 when a fused peak is past its bound."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8 * 1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--vocab", type=int, default=50258, help="graph states (absorb: 50257 tokens + MASK)")
    p.add_argument("--graph", nargs="+", choices=("absorb", "uniform"), default=["absorb", "uniform"])
    p.add_argument("--chunk-size", type=int, default=None, help="tokens per chunk (default: the loss's logits budget)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--iters", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--min-ratio", type=float, default=MIN_RATIO,
                   help="every fused row must peak this many times below the naive row (default %(default)s)")
    p.add_argument("--max-mib", type=float, default=None, help="and at most this many MiB per rank")
    p.add_argument("--no-naive", action="store_true",
                   help="skip the naive row (its full logits take GBs): only --max-mib bounds the fused rows")
    args = p.parse_args()
    if args.tokens % args.batch:
        p.error("--tokens must be a multiple of --batch")
    if args.min_ratio <= 0 or (args.max_mib is not None and args.max_mib <= 0):
        p.error("--min-ratio and --max-mib must be > 0")
    problems = []
    for graph in args.graph:
        problems += run_graph(argparse.Namespace(**{**vars(args), "graph": graph}))
    if problems:
        sys.exit("fused head+loss peak memory past its bound (a regression):\n  " + "\n  ".join(problems))


if __name__ == "__main__":
    main()
