"""One training step, side by side: this framework's step vs a reference-style SEDD step, same dims, fp32.

    python benchmarks/bench_step.py                          # every case, 2 threads (a few minutes)
    python benchmarks/bench_step.py --cases tiny-absorb --rounds 20
    python benchmarks/bench_step.py --threads 8              # another machine

Ours is `Trainer.train_step()` as `sedd_scale.train` runs it: layout-independent noising, the model under
DeepSpeed (one process, ZeRO-0, gradient clipping 1.0), the fused vocab-parallel loss, AdamW, the EMA
update; `eager` and `compiled` (model.compile: regional torch.compile) are the same trainer with the
switch flipped, so they train the same weights. The reference-style step is written below from the
formulas (sedd-math sections 2.1, 2.2, 4 and 6), the way the public code computes them: a plain
PyTorch DDiT (nn.Linear, F.layer_norm in fp32, rotary applied to the packed qkv, attention through
F.scaled_dot_product_attention, the CPU stand-in for flash-attn's fused kernel), the whole
(B, L, V) log-score tensor materialised and post-processed, score entropy by the reference's
exp-sum / linear-sum formulas, torch AdamW with its default implementation, clip_grad_norm_(1.0),
and the reference's EMA update. Both sides draw their own noise every step.

Rounds are interleaved (reference, eager, compiled, reference, ...) so that load from other
processes hits every variant alike; the table shows medians over the rounds after `--warmup` steps
(the first compiled step includes compilation, reported as compile time: the first compiled step's excess
over the median; the regions compile with dynamic shapes, so a later case reuses graphs an earlier one built). The machine this runs on
may be shared: the timings are indicative, the ratios (measured side by side) less so. Peak memory
is the growth of the process's resident set over one step (VmHWM reset through
/proc/self/clear_refs after returning freed heap memory to the kernel): activations, gradients and
temporaries; the persistent weights and optimizer state are not counted.
"""
from __future__ import annotations

import argparse
import ctypes
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if "--warm-cache" not in sys.argv:  # compile time as a first run sees it: an empty inductor cache (read at compile)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench_step_inductor_")


@dataclass(frozen=True)
class Case:
    """A benchmark row: model dims, graph, micro-batch."""

    name: str
    hidden: int
    heads: int
    blocks: int
    cond: int
    graph: str
    batch: int
    length: int
    num_tokens: int = 50257  # GPT-2

    @property
    def tokens(self) -> int:
        """Tokens per step."""
        return self.batch * self.length


CASES = {c.name: c for c in (
    Case("tiny-absorb", 128, 4, 4, 64, "absorb", 4, 128),
    Case("tiny-uniform", 128, 4, 4, 64, "uniform", 4, 128),
    Case("small-absorb", 768, 12, 12, 128, "absorb", 1, 1024),  # sedd-small
)}


# --- the reference-style step (sedd-math 2.1, 2.2, 4, 6) ----------------------------------------
class RefLayerNorm(nn.Module):
    """F.layer_norm in fp32 without bias, times a weight."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        """Normalised x times the weight."""
        return F.layer_norm(x.float(), [self.dim]) * self.weight[None, None, :]


def rotate_half(x: Tensor) -> Tensor:
    """[u1, u2] -> [-u2, u1]."""
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class RefBlock(nn.Module):
    """adaLN-modulated attention + GELU-tanh MLP, residual branches gated (sedd-math 4)."""

    def __init__(self, h: int, heads: int, cond: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1, self.norm2 = RefLayerNorm(h), RefLayerNorm(h)
        self.attn_qkv = nn.Linear(h, 3 * h, bias=False)
        self.attn_out = nn.Linear(h, h, bias=False)
        self.mlp = nn.Sequential(nn.Linear(h, 4 * h), nn.GELU(approximate="tanh"), nn.Linear(4 * h, h))
        self.adaLN_modulation = nn.Linear(cond, 6 * h)
        nn.init.zeros_(self.adaLN_modulation.weight)
        nn.init.zeros_(self.adaLN_modulation.bias)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, c: Tensor) -> Tensor:
        """One block."""
        b, length, h = x.shape
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c)[:, None].chunk(6, dim=2)
        qkv = self.attn_qkv(self.norm1(x) * (1 + sc1) + sh1).view(b, length, 3, self.heads, h // self.heads)
        qkv = qkv * cos + rotate_half(qkv) * sin  # the packed qkv; v's rows of cos/sin are 1/0
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, length, h)
        x = x + g1 * F.dropout(self.attn_out(o), self.dropout, self.training)
        return x + g2 * F.dropout(self.mlp(self.norm2(x) * (1 + sc2) + sh2), self.dropout, self.training)


class RefSEDD(nn.Module):
    """The DDiT: embedding, sigma map, blocks, final layer, then the log-score post-processing."""

    def __init__(self, case: Case, dropout: float):
        super().__init__()
        h, self.absorb = case.hidden, case.graph == "absorb"
        self.vocab = case.num_tokens + self.absorb
        self.embedding = nn.Parameter(torch.empty(self.vocab, h))
        nn.init.kaiming_uniform_(self.embedding, a=math.sqrt(5))
        self.sigma_map = nn.Sequential(nn.Linear(256, case.cond), nn.SiLU(), nn.Linear(case.cond, case.cond))
        self.blocks = nn.ModuleList(RefBlock(h, case.heads, case.cond, dropout) for _ in range(case.blocks))
        self.norm_final = RefLayerNorm(h)
        self.final_mod = nn.Linear(case.cond, 2 * h)
        self.linear = nn.Linear(h, self.vocab)
        for layer in (self.final_mod, self.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        d = h // case.heads
        inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
        emb = torch.outer(torch.arange(case.length).float(), inv_freq).repeat(1, 2)
        cos = emb.cos()[None, :, None, None, :].repeat(1, 1, 3, 1, 1)
        sin = emb.sin()[None, :, None, None, :].repeat(1, 1, 3, 1, 1)
        cos[:, :, 2], sin[:, :, 2] = 1.0, 0.0
        self.register_buffer("cos", cos)
        self.register_buffer("sin", sin)

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        """Log-scores (B, L, V)."""
        freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
        args = sigma[:, None].float() * freqs[None]
        c = F.silu(self.sigma_map(torch.cat([torch.cos(args), torch.sin(args)], dim=-1)))
        h = self.embedding[x]
        for block in self.blocks:
            h = block(h, self.cos, self.sin, c)
        shift, scale = self.final_mod(c)[:, None].chunk(2, dim=2)
        out = self.linear(self.norm_final(h) * (1 + scale) + shift)
        if self.absorb:  # scale_by_sigma
            esigm1 = torch.where(sigma < 0.5, torch.expm1(sigma), sigma.exp() - 1)
            out = out - esigm1.log()[:, None, None] - math.log(out.shape[-1] - 1)
        return torch.scatter(out, -1, x[..., None], torch.zeros_like(out[..., :1]))


def ref_noise(graph: str, t: Tensor) -> tuple[Tensor, Tensor]:
    """(total noise, rate): log-linear (eps 1e-3) for absorb, geometric (1e-4, 20) for uniform."""
    if graph == "absorb":
        return -torch.log1p(-(1 - 1e-3) * t), (1 - 1e-3) / (1 - (1 - 1e-3) * t)
    sigma = 1e-4 ** (1 - t) * 20.0 ** t
    return sigma, sigma * math.log(20.0 / 1e-4)


def ref_score_entropy(ls: Tensor, sigma: Tensor, xt: Tensor, x0: Tensor, absorb: bool) -> Tensor:
    """Per-token score entropy from the whole log-score tensor (sedd-math 2.1), the reference's formulas."""
    esigm1 = torch.where(sigma < 0.5, torch.expm1(sigma), torch.exp(sigma) - 1)
    if absorb:
        masked = xt == ls.shape[-1] - 1
        ratio = 1 / esigm1.expand_as(xt)[masked]
        neg = ratio * torch.gather(ls[masked], -1, x0[masked][..., None]).squeeze(-1)
        pos = ls[masked][:, :-1].exp().sum(dim=-1)
        out = torch.zeros(*xt.shape, device=xt.device)
        out[masked] += pos - neg + ratio * (ratio.log() - 1)
        return out
    n = ls.shape[-1]
    ratio = esigm1 / (esigm1 + n)
    neg = ls.mean(dim=-1) - torch.gather(ls, -1, xt[..., None]).squeeze(-1) / n
    neg = torch.where(xt == x0, ratio * neg, torch.gather(ls, -1, x0[..., None]).squeeze(-1) / esigm1 + neg)
    sexp = ls.exp()
    pos = sexp.mean(dim=-1) - torch.gather(sexp, -1, xt[..., None]).squeeze(-1) / n
    const = torch.where(xt == x0, (n - 1) / n * ratio * (ratio.log() - 1),
                        ((-ratio.log() - 1) / ratio - (n - 2)) / n)
    return pos - neg + const


class RefEMA:
    """shadow -= (1 - d) (shadow - param), d = min(decay, (1 + n) / (10 + n))."""

    def __init__(self, params, decay: float = 0.9999):
        self.params = list(params)
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay, self.n = decay, 0

    @torch.no_grad()
    def update(self) -> None:
        """Fold the parameters in."""
        self.n += 1
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        for s, p in zip(self.shadow, self.params):
            s.sub_((1.0 - d) * (s - p))


class RefStep:
    """The reference-style training step on random tokens."""

    def __init__(self, case: Case, dropout: float):
        self.case = case
        self.model = RefSEDD(case, dropout).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=3e-4, betas=(0.9, 0.999), eps=1e-8,
                                     weight_decay=0.0)
        self.ema = RefEMA(self.model.parameters())
        self.gen = torch.Generator().manual_seed(0)

    def __call__(self) -> None:
        """Noise, forward, loss, backward, clip, AdamW, EMA."""
        c = self.case
        x0 = torch.randint(0, c.num_tokens, (c.batch, c.length), generator=self.gen)
        t = (1 - 1e-3) * torch.rand(c.batch) + 1e-3
        sigma, dsigma = ref_noise(c.graph, t)
        move = torch.rand(x0.shape) < 1 - torch.exp(-sigma[:, None])
        other = c.num_tokens if c.graph == "absorb" else torch.randint(0, c.num_tokens, x0.shape)
        xt = torch.where(move, other, x0)
        ls = self.model(xt, sigma)
        se = ref_score_entropy(ls, sigma[:, None], xt, x0, c.graph == "absorb")
        loss = (dsigma[:, None] * se).sum(dim=-1).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=1.0)
        self.opt.step()
        self.opt.zero_grad()
        self.ema.update()


# --- this framework's step ------------------------------------------------------------------------
class RandomTokens:
    """An endless loader of random micro-batches (what the trainer's loader yields)."""

    def __init__(self, case: Case):
        self.case, self.gen = case, torch.Generator().manual_seed(1)

    def __iter__(self):
        while True:
            yield torch.randint(0, self.case.num_tokens, (self.case.batch, self.case.length), generator=self.gen)

    def state_dict(self) -> dict:
        """Nothing to resume."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to resume."""


def build_trainer(case: Case, dropout: float, run_dir: str, precision: str = "fp32", recompute: bool = False,
                  zero_stage: int = 0):
    """A Trainer (world of one) for `case` on random tokens, compile switch on (flip `model_cfg.compile`)."""
    from sedd_scale.distributed import engine
    from sedd_scale.config import Recipe, from_dict
    from sedd_scale.train.trainer import Trainer

    absorb = case.graph == "absorb"
    recipe = from_dict(Recipe, {
        "model": {"hidden_size": case.hidden, "n_heads": case.heads, "n_blocks": case.blocks, "cond_dim": case.cond,
                  "num_tokens": case.num_tokens, "graph": case.graph, "scale_by_sigma": absorb,
                  "length": case.length, "vocab_multiple": 1, "dropout": dropout, "compile": True,
                  "precision": precision, "activation_checkpointing": recompute},
        "data": {"manifests": ["unused/manifest.json"], "tokenizer": None, "seq_len": case.length},
        "diffusion": {"noise": "loglinear" if absorb else "geometric"},
        "optim": {"lr": 3e-4, "warmup": 0, "grad_clip": 1.0},
        "parallel": {"zero_stage": zero_stage, "micro_batch": case.batch, "global_batch": case.batch},
        "train": {"steps": 10**6, "ema": 0.9999},
        "checkpoint": {"dir": run_dir}})
    layout, topology = engine.setup(recipe)
    return Trainer(recipe, layout, topology, loader=RandomTokens(case))


# --- measurement ----------------------------------------------------------------------------------
_LIBC = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def measure(step) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds of all threads, peak resident growth in bytes) of one call."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
    base = _rss_kib("VmRSS") if _LIBC is not None else 0
    start, cpu = time.perf_counter(), time.process_time()
    step()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = (_rss_kib("VmHWM") - base) * 1024 if _LIBC is not None else float("nan")
    return elapsed, cpu, peak


def run_case(case: Case, args) -> list[dict]:
    """Interleaved rounds of every variant; one summary row per variant."""
    from sedd_scale.distributed import parallel

    torch.manual_seed(0)
    ref = RefStep(case, args.dropout)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = build_trainer(case, args.dropout, run_dir)
        cfg = trainer.model_cfg

        def ours(compiled: bool):
            def step():
                cfg.compile = compiled
                trainer.train_step()
            return step

        variants = {"reference-style": ref, "ours eager": ours(False), "ours compiled": ours(True)}
        times = {k: [] for k in variants}
        cpus = {k: [] for k in variants}
        peaks = {k: [] for k in variants}
        first = {}
        for r in range(args.warmup + args.rounds):
            for name, step in variants.items():
                seconds, cpu, peak = measure(step)
                first.setdefault(name, seconds)
                if r >= args.warmup:
                    times[name].append(seconds)
                    cpus[name].append(cpu)
                    peaks[name].append(peak)
        trainer.saver.close()
        parallel.destroy_parallel()
    rows = []
    ref = {"time": statistics.median(times["reference-style"]), "best": min(times["reference-style"]),
           "cpu": statistics.median(cpus["reference-style"])}
    for name in variants:
        t, best, cpu = statistics.median(times[name]), min(times[name]), statistics.median(cpus[name])
        rows.append(dict(case=case.name, variant=name, time=t, best=best, cpu=cpu, tokens_per_s=case.tokens / t,
                         peak=max(peaks[name]), ratio=ref["time"] / t, ratio_best=ref["best"] / best,
                         ratio_cpu=ref["cpu"] / cpu, compile=first[name] - t if name == "ours compiled" else None))
    return rows


def main() -> None:
    """Parse options, run the cases, print the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    p.add_argument("--rounds", type=int, default=None, help="measured rounds (default: 12 tiny, 4 small)")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured rounds first (compilation happens here)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.1, help="residual-branch dropout, both sides (paper: 0.1)")
    p.add_argument("--warm-cache", action="store_true",
                   help="reuse the user's inductor cache (default: an empty one, so compile time is a first run's)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, fp32, dropout {args.dropout}; step = median wall time "
          f"over interleaved rounds (best = fastest round, CPU = median CPU time of all threads, which a loaded "
          f"machine inflates less); indicative timings (the machine may be shared)", flush=True)
    print("| case | tokens/step | variant | step (s) | tokens/s | vs reference | best (s) | vs ref (best) | CPU (s) | "
          "vs ref (CPU) | peak step RSS (MiB) | compile (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for name in args.cases:
        case = CASES[name]
        rounds = args.rounds or (4 if case.name.startswith("small") else 12)
        for row in run_case(case, argparse.Namespace(**{**vars(args), "rounds": rounds})):
            comp = "" if row["compile"] is None else f"{max(row['compile'], 0.0):.1f}"
            print(f"| {row['case']} | {case.tokens} | {row['variant']} | {row['time']:.3f} | "
                  f"{row['tokens_per_s']:.0f} | {row['ratio']:.2f}x | {row['best']:.3f} | {row['ratio_best']:.2f}x | "
                  f"{row['cpu']:.2f} | {row['ratio_cpu']:.2f}x | {row['peak'] / 2**20:.0f} | {comp} |", flush=True)


if __name__ == "__main__":
    main()
