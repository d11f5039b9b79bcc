"""FLOPs per token, step time (compute, pipeline bubble, TP and DP communication), tokens/s and MFU."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sedd_scale.plan.flops import projected_fraction, training_flops_per_token
from sedd_scale.plan.hardware import Assumptions, Gpu
from sedd_scale.plan.memory import Candidate, precision_of, stage_params

if TYPE_CHECKING:  # the planner reads recipes; the recipe CLI imports the planner
    from sedd_scale.config import Recipe


# ---------------------------------------------------------------------------------------------
# FLOPs and time.
@dataclass(frozen=True)
class Flops:
    """FLOPs per trained token of the whole model (all TP ranks together)."""

    model: float  # the training arithmetic: forward + backward, no recomputation (MFU's numerator)
    executed: float  # what the GPUs run: + flash attention's and checkpointing's recomputation
    blocks_executed: float  # the blocks' share of `executed` (pipeline stages split it)
    head_executed: float  # the output layer and loss (last stage)


def flops_per_token(recipe: "Recipe", recompute: bool, masked: float | None = None) -> Flops:
    """Matmul FLOPs per token (see the module docstring for what is counted); `masked`: the fraction of
    tokens the loss projects (default: `flops.projected_fraction(recipe)`, its expectation)."""
    m = recipe.model
    h, c, r, s = m.hidden_size, m.cond_dim, m.mlp_ratio, recipe.data.seq_len
    masked = projected_fraction(recipe) if masked is None else masked
    model = training_flops_per_token(m, s, masked)  # what the trainer logs MFU with
    # What the GPUs run on top: flash attention's backward recomputes the scores (5 matmuls instead of 4
    # of L x H per token), and checkpointing runs each block's forward again.
    forward = 2 * (4 + 2 * r) * h * h + 4 * s * h + 2 * c * 6 * h / s
    blocks_model = m.n_blocks * (3 * (2 * (4 + 2 * r) * h * h + 2 * c * 6 * h / s) + 3 * 4 * s * h)
    extra = m.n_blocks * (2 * s * h + (forward if recompute else 0.0))
    head = 3 * 2 * 2 * c * h / s + 6 * h * m.num_tokens * masked  # final adaLN, logits, d h, d w
    return Flops(model=model, executed=model + extra, blocks_executed=blocks_model + extra, head_executed=head)


@dataclass(frozen=True)
class StepTime:
    """An estimated optimizer step: compute, communication and pipeline bubble (seconds)."""

    compute: float  # busy time of the slowest stage over all micro-batches
    tp_comm: float
    dp_comm: float
    bubble: float  # idle time of the pipeline schedule
    total: float


def _peak_rate(recipe: "Recipe", gpu: Gpu, peak_tflops: float | None) -> float:
    """FLOP/s the matmuls of this precision can reach at best on one GPU."""
    if recipe.model.precision == "fp32":
        return gpu.tf32_tflops * 1e12
    return (peak_tflops or gpu.bf16_tflops) * 1e12


def step_time(recipe: "Recipe", c: Candidate, gpu: Gpu, a: Assumptions, peak_tflops: float | None = None) -> StepTime:
    """Estimated seconds per optimizer step: the slowest stage's compute and TP all-reduces per micro-batch,
    times (grad_accum + pp - 1) micro-batch slots (1F1B), plus the data-parallel gradient exchange."""
    m = recipe.model
    prec = precision_of(m.precision)
    f = flops_per_token(recipe, c.recompute)
    tokens = c.micro_batch * recipe.data.seq_len
    rate = _peak_rate(recipe, gpu, peak_tflops) * a.efficiency
    blocks = m.n_blocks // c.pp
    per_block = f.blocks_executed / m.n_blocks
    head = f.head_executed
    # bf16-mixed: the fused loss runs the head GEMMs with bf16 operands too (pipeline.head_loss_config).
    stage_flops = [tokens / c.tp * (blocks * per_block + (head if s == c.pp - 1 else 0.0)) for s in range(c.pp)]
    # Small micro-batches pay a fixed launch/framework cost per block that large ones amortise.
    micro_compute = max(stage_flops) / rate + blocks * a.block_overhead_s
    # TP: two all-reduces of the (tokens, H) activations per block forward, two in backward, two more
    # when the forward is recomputed; ring all-reduce moves 2 (t - 1) / t of the bytes.
    tp_bw = (a.intra_node_gbps if c.tp <= a.gpus_per_node else a.inter_node_gbps) * 1e9
    reduces = blocks * (6 if c.recompute else 4)
    micro_tp = 0.0 if c.tp == 1 else reduces * 2 * (c.tp - 1) / c.tp * tokens * m.hidden_size * prec.compute / tp_bw
    slots = c.grad_accum + c.pp - 1
    compute = c.grad_accum * micro_compute
    tp_comm = c.grad_accum * micro_tp
    bubble = (c.pp - 1) * (micro_compute + micro_tp)
    dp_comm = _dp_comm_seconds(recipe, c, a)
    return StepTime(compute, tp_comm, dp_comm, bubble, slots * (micro_compute + micro_tp) + dp_comm)


def _dp_comm_seconds(recipe: "Recipe", c: Candidate, a: Assumptions) -> float:
    """The data-parallel exchange per step (not overlapped: DeepSpeed's overlap_comm is off below ZeRO-3)."""
    if c.dp == 1:
        return 0.0
    m = recipe.model
    w = precision_of(m.precision).weight
    p = max(stage_params(m, c.tp, c.pp, s).total for s in range(c.pp))
    # A DP group holds ranks tp apart (rank = tp_rank + TP (dp_rank + DP pp_rank)): inside a node iff tp * dp fits.
    bw = (a.intra_node_gbps if c.tp * c.dp <= a.gpus_per_node else a.inter_node_gbps) * 1e9
    frac = (c.dp - 1) / c.dp
    if c.zero_stage == 0 or (w == 2 and c.zero_stage == 1):
        grad_bytes = 4 if (w == 4 or c.zero_stage == 1) else 2
        volume = 2 * frac * p * grad_bytes  # all-reduce of the gradients
        if w == 2 and (c.zero_stage == 1 or c.pp > 1):
            volume += frac * p * w  # BF16_Optimizer all-gathers the bf16 weights its DP partitions updated
    elif c.zero_stage in (1, 2):
        volume = frac * p * w * 2  # reduce-scatter of gradients + all-gather of updated weights
    else:  # ZeRO-3: gradients reduce-scattered once; weights gathered for forward and backward of every micro-batch
        volume = frac * p * w * (1 + 2 * c.grad_accum)
    return volume / bw


def bubble_fraction(pp: int, grad_accum: int) -> float:
    """Idle fraction of DeepSpeed's 1F1B pipeline schedule: (pp - 1) / (grad_accum + pp - 1)."""
    return (pp - 1) / (grad_accum + pp - 1)
