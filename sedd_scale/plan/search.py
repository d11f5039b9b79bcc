"""A plan (memory, time, warnings) for a layout, and the search over every layout a world size allows."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sedd_scale.layout import divisors
from sedd_scale.model.config import ModelConfig
from sedd_scale.plan.hardware import COMPILE_MINUTES_PER_STAGE, DEFAULT_GPU, GB, GPUS, Assumptions, Gpu
from sedd_scale.plan.memory import EVAL_PHASES, Candidate, StageMemory, device_bytes, stage_memory, stages
from sedd_scale.plan.speed import Flops, StepTime, bubble_fraction, flops_per_token, step_time

if TYPE_CHECKING:  # the planner reads recipes; the recipe CLI imports the planner
    from sedd_scale.config import Recipe


# ---------------------------------------------------------------------------------------------
# Plans.
@dataclass(frozen=True)
class Plan:
    """Everything the planner says about one candidate."""

    candidate: Candidate
    gpu: Gpu
    peak_tflops: float  # the figure MFU is measured against
    assumptions: Assumptions
    memory: tuple[StageMemory, ...]  # the distinct stages (first, middle, last)
    bubble: float
    time: StepTime
    tokens_per_s: float
    mfu: float
    flops: Flops
    warnings: tuple[str, ...] = ()

    @property
    def worst(self) -> StageMemory:
        """The stage with the highest tensor peak."""
        return max(self.memory, key=lambda s: s.peak)

    @property
    def needed_bytes(self) -> float:
        """Device memory the worst stage needs, reserve included."""
        return device_bytes(self.worst.peak, self.assumptions)

    @property
    def fits(self) -> bool:
        """Whether the worst stage fits the GPU's memory."""
        return self.needed_bytes <= self.gpu.memory_bytes


BUBBLE_WARN = 0.10
# Warn when a stage's estimated compile time (high estimate) reaches this share of the process-group
# timeout, which the other stages wait in: the estimate is uncertain by about 2x.
COMPILE_WARN = 0.5


def plan(recipe: "Recipe", c: Candidate, gpu: Gpu | None = None, a: Assumptions = Assumptions(),
         peak_tflops: float | None = None) -> Plan:
    """Memory, bubble, step time, MFU and warnings of candidate `c` for `recipe`."""
    gpu = gpu or GPUS[DEFAULT_GPU]
    peak = peak_tflops or gpu.bf16_tflops
    memory = tuple(stage_memory(recipe, c, s, a) for s in stages(c.pp))
    bubble = bubble_fraction(c.pp, c.grad_accum)
    t = step_time(recipe, c, gpu, a, peak)
    f = flops_per_token(recipe, c.recompute)
    tokens = c.micro_batch * c.dp * c.grad_accum * recipe.data.seq_len
    mfu = f.model * tokens / t.total / (c.world_size * peak * 1e12)
    p = Plan(c, gpu, peak, a, memory, bubble, t, tokens / t.total, mfu, f)
    return dataclasses.replace(p, warnings=tuple(_warnings(recipe, p)))


def _warnings(recipe: "Recipe", p: Plan) -> list[str]:
    c, out = p.candidate, []
    if p.bubble > BUBBLE_WARN:
        out.append(f"pipeline bubble {p.bubble:.0%} > {BUBBLE_WARN:.0%}: PP {c.pp} runs {c.grad_accum} micro-batches "
                   f"per step in {c.grad_accum + c.pp - 1} slots; raise the gradient accumulation to >= "
                   f"{_accum_for(c.pp)} (a smaller parallel.micro_batch or a larger global_batch) or lower parallel.pp")
    worst = p.worst
    if not p.fits:
        during = (" (validation and sampling load the whole EMA next to the training weights: a run without "
                  f"them peaks at {worst.training_peak / GB:.1f} GB)" if worst.peak_phase in EVAL_PHASES else "")
        out.append(f"memory: stage {worst.stage} needs {p.needed_bytes / GB:.1f} GB per GPU (tensor peak "
                   f"{worst.peak / GB:.1f} GB in the {worst.peak_phase} phase{during}, plus reserve) > the "
                   f"{p.gpu.memory_bytes / GB:.0f} GB of an {p.gpu.name}: --propose lists layouts that fit (more "
                   "TP/PP or ZeRO, activation checkpointing, a smaller micro batch)")
    elif c.recompute:
        off = plan_without_recompute(recipe, p)
        if off.fits:
            out.append(f"activation checkpointing is on although the layout fits without it "
                       f"({off.needed_bytes / GB:.1f} of {p.gpu.memory_bytes / GB:.0f} GB): "
                       f"model.activation_checkpointing: false takes the step from {p.time.total:.3g} s to "
                       f"{off.time.total:.3g} s")
    if recipe.model.compile and c.pp > 1:
        low, high = COMPILE_MINUTES_PER_STAGE
        timeout = recipe.parallel.distributed_timeout_minutes  # how long the other stages wait in a collective
        if high >= COMPILE_WARN * timeout:
            out.append(f"compile: every pipeline stage compiles its regions before the first transfer (about "
                       f"{low:.3g}-{high:.3g} min, all stages at once) while the others wait, against the "
                       f"{timeout:g} min process-group timeout (parallel.distributed_timeout_minutes); raise it, "
                       "warm the compile cache, or set model.compile: false")
    bucket = worst.item("buffers")
    if c.zero_stage > 0 and "bucket" in bucket.note and bucket.backward > 0.05 * worst.peak:
        out.append(f"DeepSpeed's ZeRO reduce buckets take {bucket.backward / GB:.2f} GB per GPU "
                   f"({bucket.note.split('(')[-1].rstrip(')')}, allocated whole): a smaller "
                   f"parallel.zero_reduce_bucket_size (now {recipe.parallel.zero_reduce_bucket_size:.3g}) lowers it")
    return out


def plan_without_recompute(recipe: "Recipe", p: Plan) -> Plan:
    """The same plan with activation checkpointing off."""
    return plan(recipe, dataclasses.replace(p.candidate, recompute=False), p.gpu, p.assumptions, p.peak_tflops)


def _accum_for(pp: int) -> int:
    """The smallest gradient accumulation with a bubble of at most BUBBLE_WARN."""
    return math.ceil((pp - 1) * (1 - BUBBLE_WARN) / BUBBLE_WARN)


def accumulates_in_bf16(m: ModelConfig, c: Candidate) -> bool:
    """Whether gradients of several micro-batches are summed in bf16: bf16 weights outside ZeRO-1 (only
    BF16_Optimizer under ZeRO-1 gets engine.deepspeed_config's fp32 accumulator), with grad_accum > 1."""
    return m.precision == "bf16" and c.zero_stage != 1 and c.grad_accum > 1


def sequence_splits(recipe: "Recipe", tp: int, a: Assumptions = Assumptions()) -> list[tuple[int, bool]]:
    """The (context parallel, sequence parallel) choices the planner tries with `tp`: CP sizes dividing the
    heads of a TP rank and data.seq_len, with TP x CP at most two nodes' GPUs (Ulysses' all-to-alls cross the
    network beyond one node); SP on and off when tp > 1 (it needs seq_len divisible by tp x cp)."""
    m, s = recipe.model, recipe.data.seq_len
    out = []
    for cp in divisors(m.n_heads // tp):
        if s % cp or tp * cp > 2 * a.gpus_per_node:
            continue
        out += [(cp, sp) for sp in ((False, True) if tp > 1 and s % (tp * cp) == 0 else (False,))]
    return out


def candidates(recipe: "Recipe", world_size: int, a: Assumptions = Assumptions()) -> list[Candidate]:
    """Every layout the trainer accepts for `world_size`: tp | heads and tp <= GPUs per node, CP and SP as
    `sequence_splits` allows, pp | blocks, ZeRO 0-3 (0-1 with a pipeline; not 0 with bf16 weights), micro
    batches dividing the per-rank batch, recompute on and off."""
    m, g = recipe.model, recipe.parallel.global_batch
    out = []
    for tp in (t for t in divisors(m.n_heads) if t <= a.gpus_per_node):
        for cp, sp in sequence_splits(recipe, tp, a):
            for pp in divisors(m.n_blocks):
                if world_size % (tp * cp * pp):
                    continue
                dp = world_size // (tp * cp * pp)
                if g % dp:
                    continue
                for micro in divisors(g // dp):
                    for zero in ((0, 1) if pp > 1 else (0, 1, 2, 3))[1 if m.precision == "bf16" else 0:]:
                        for recompute in (False, True):
                            out.append(Candidate.of(tp, pp, dp, zero, micro, g // (dp * micro), recompute,
                                                    cp=cp, sp=sp))
    return out


def propose(recipe: "Recipe", world_size: int, gpu: Gpu | None = None, a: Assumptions = Assumptions(),
            peak_tflops: float | None = None) -> list[Plan]:
    """The candidates that fit the GPU, fastest first (ties: less memory), leaving out those that
    accumulate gradients in bf16 (DeepSpeed itself warns that this is numerically unsafe)."""
    plans = [plan(recipe, c, gpu, a, peak_tflops) for c in candidates(recipe, world_size, a)
             if not accumulates_in_bf16(recipe.model, c)]
    fitting = [p for p in plans if p.fits]
    return sorted(fitting, key=lambda p: (-p.tokens_per_s, p.needed_bytes))


# ---------------------------------------------------------------------------------------------
# A larger global batch.
BATCH_MULTIPLES = (1, 2, 4, 8, 16, 32, 64)  # of the recipe's global batch, tried by `propose_global_batch`
NEAR_BEST = 0.9  # "near the best": within 10% of the highest MFU any tried global batch reaches
STARVED = 0.8  # propose a larger batch only when the recipe's reaches less than this share of that MFU


@dataclass(frozen=True)
class BatchProposal:
    """A larger global batch for a world size that starves the pipeline. It changes the training
    hyperparameters (tokens per step; the learning rate, warmup and step count were tuned for the recipe's)."""

    multiple: int  # of the recipe's parallel.global_batch
    global_batch: int  # sequences per step
    tokens_per_step: int
    plan: Plan  # the fastest layout that fits at that batch
    current: Plan | None  # the fastest at the recipe's batch (None: nothing fits)
    best_mfu: float  # the highest MFU over BATCH_MULTIPLES


def with_global_batch(recipe: "Recipe", global_batch: int) -> "Recipe":
    """The recipe with parallel.global_batch replaced (the planner's copy; the recipe itself is left alone)."""
    return dataclasses.replace(recipe, parallel=dataclasses.replace(recipe.parallel, global_batch=global_batch))


def propose_global_batch(recipe: "Recipe", world_size: int, gpu: Gpu | None = None, a: Assumptions = Assumptions(),
                         peak_tflops: float | None = None) -> BatchProposal | None:
    """When the recipe's global batch starves the world size (its fastest fitting layout reaches less than
    STARVED of the highest MFU any power-of-two multiple up to 64x reaches): the smallest multiple whose
    fastest layout comes within NEAR_BEST of that MFU, preferring one whose bubble is at most BUBBLE_WARN.
    None when the recipe's batch is not starved (or nothing fits at any batch)."""
    fastest: dict[int, Plan] = {}
    for m in BATCH_MULTIPLES:
        plans = propose(with_global_batch(recipe, recipe.parallel.global_batch * m), world_size, gpu, a, peak_tflops)
        if plans:
            fastest[m] = plans[0]
    if not fastest:
        return None
    best = max(p.mfu for p in fastest.values())
    if 1 in fastest and fastest[1].mfu >= STARVED * best:
        return None
    near = [m for m, p in fastest.items() if p.mfu >= NEAR_BEST * best]
    chosen = min([m for m in near if fastest[m].bubble <= BUBBLE_WARN] or near)
    g = recipe.parallel.global_batch * chosen
    return BatchProposal(chosen, g, g * recipe.data.seq_len, fastest[chosen], fastest.get(1), best)
