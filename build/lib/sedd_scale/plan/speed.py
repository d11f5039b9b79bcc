"""FLOPs per token, step time (compute, pipeline bubble, TP, DP and pipeline communication), tokens/s and MFU."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sedd_scale.plan.flops import projected_fraction, training_flops_per_token
from sedd_scale.plan.hardware import Assumptions, Gpu
from sedd_scale.plan.memory import Candidate, precision_of, stage_params, stages

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
    p2p: float = 0.0  # pipeline sends and receives of activations and their gradients


# ---------------------------------------------------------------------------------------------
# The network.
def group_bandwidth(size: int, stride: int, a: Assumptions) -> float:
    """Bus bandwidth (bytes/s per rank) of a collective over `size` ranks `stride` apart while every GPU runs the
    same collective in its own group (all DP groups reduce at once; likewise TP groups).

    Ranks fill nodes of g = gpus_per_node in order. A group inside a node (size x stride <= g) runs on NVLink:
    B = intra_node_gbps. A group spanning nodes has k = max(1, g // stride) members in each node it touches
    (capped at `size`), so a node carries g / k groups at once. A ring over such a group crosses the network
    once per node, and each crossing carries the whole ring's traffic, 2 (n - 1) / n x V for an all-reduce
    of V bytes; so the node sends (g / k) x 2 (n - 1) / n x V over its inter_node_gbps (B_node, per
    direction), while each GPU moves 2 (n - 1) / n x V over NVLink. NCCL's hierarchical form (reduce-scatter
    in the node, all-reduce of V / k between nodes on k rails of B_node / g each, all-gather in the node) has
    the same network term, 2 (m - 1) / m x (V / k) / (B_node / g) with m = n / k nodes, to a factor
    (m - 1) / m vs (n - 1) / n. Hence

        t = 2 (n - 1) / n x V / B,   B = min(intra_node_gbps, inter_node_gbps x k / g)

    for an all-reduce (reduce-scatter and all-gather: (n - 1) / n x V / B each). For one DP group per node
    (TP 1, k = g) B is the node's whole network bandwidth (400 GB/s for 8 x 400 Gb/s InfiniBand), not one NIC's.
    """
    g = a.gpus_per_node
    if size * stride <= g:
        return a.intra_node_gbps * 1e9
    k = min(size, max(1, g // stride))
    return min(a.intra_node_gbps, a.inter_node_gbps * k / g) * 1e9


def p2p_bandwidth(c: Candidate, a: Assumptions) -> float:
    """Bytes/s of one pipeline send between neighbouring stages: NVLink when the whole pipeline of a model
    replica sits in one node (tp x dp x pp <= g), else the network, whose per-direction bandwidth per node is
    shared by the ranks of a stage that send across at once: min(g, tp x dp) of them (every DP replica and TP
    rank sends its own copy of the activations at the same moment of the 1F1B schedule)."""
    g = a.gpus_per_node
    if c.tp * c.dp * c.pp <= g:
        return a.intra_node_gbps * 1e9
    return min(a.intra_node_gbps, a.inter_node_gbps / min(g, c.tp * c.dp)) * 1e9


def p2p_seconds_per_micro_batch(recipe: "Recipe", c: Candidate, a: Assumptions) -> float:
    """A stage's pipeline traffic per micro-batch: the activations (micro_batch x seq_len x hidden in the
    residual stream's dtype) sent forward and their gradient sent back, at `p2p_bandwidth`. DeepSpeed's
    pipeline engine sends and receives blocking, so this is not overlapped with compute."""
    if c.pp == 1:
        return 0.0
    m = recipe.model
    activation = c.micro_batch * recipe.data.seq_len * m.hidden_size * precision_of(m.precision).residual
    return 2 * activation / p2p_bandwidth(c, a)


def _peak_rate(recipe: "Recipe", gpu: Gpu, peak_tflops: float | None) -> float:
    """FLOP/s the matmuls of this precision can reach at best on one GPU."""
    if recipe.model.precision == "fp32":
        return gpu.tf32_tflops * 1e12
    return (peak_tflops or gpu.bf16_tflops) * 1e12


def step_time(recipe: "Recipe", c: Candidate, gpu: Gpu, a: Assumptions, peak_tflops: float | None = None) -> StepTime:
    """Estimated seconds per optimizer step: the slowest stage's compute, TP all-reduces and pipeline sends per
    micro-batch, times (grad_accum + pp - 1) micro-batch slots (1F1B), plus the data-parallel gradient exchange."""
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
    # when the forward is recomputed (TP ranks are adjacent: stride 1).
    reduces = blocks * (6 if c.recompute else 4)
    micro_tp = 0.0 if c.tp == 1 else (reduces * 2 * (c.tp - 1) / c.tp * tokens * m.hidden_size * prec.compute
                                      / group_bandwidth(c.tp, 1, a))
    micro_p2p = p2p_seconds_per_micro_batch(recipe, c, a)
    slot = micro_compute + micro_tp + micro_p2p
    dp_comm = _dp_comm_seconds(recipe, c, a)
    return StepTime(compute=c.grad_accum * micro_compute, tp_comm=c.grad_accum * micro_tp, dp_comm=dp_comm,
                    bubble=(c.pp - 1) * slot, total=(c.grad_accum + c.pp - 1) * slot + dp_comm,
                    p2p=c.grad_accum * micro_p2p)


def _dp_comm_seconds(recipe: "Recipe", c: Candidate, a: Assumptions) -> float:
    """The data-parallel exchange per step (not overlapped: DeepSpeed's overlap_comm is off below ZeRO-3)."""
    if c.dp == 1:
        return 0.0
    m = recipe.model
    w = precision_of(m.precision).weight
    p = max(stage_params(m, c.tp, c.pp, s).total for s in stages(c.pp))  # middle stages are alike
    # A DP group holds ranks tp apart (rank = tp_rank + TP (dp_rank + DP pp_rank)).
    bw = group_bandwidth(c.dp, c.tp, a)
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
