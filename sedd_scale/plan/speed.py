"""FLOPs per token, step time (compute, pipeline bubble, TP, DP and pipeline communication), tokens/s and MFU."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sedd_scale.plan.flops import projected_fraction, training_flops_per_token
from sedd_scale.plan.hardware import Assumptions, Gpu
from sedd_scale.plan.memory import (
    Candidate,
    overlaps_reduction,
    precision_of,
    stage_params,
    stages,
    tokens_per_rank,
    uses_bf16_optimizer,
)

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
    dp_hidden: float = 0.0  # DP traffic hidden behind compute (overlap_comm); dp_comm is what is left exposed
    cp_comm: float = 0.0  # context parallelism's all-to-alls around attention (Ulysses)


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
    replica sits in one node (tp x cp x dp x pp <= g), else the network, whose per-direction bandwidth per node is
    shared by the ranks of a stage that send across at once: min(g, tp x cp x dp) of them (every DP replica, CP
    rank and TP rank sends its own activations at the same moment of the 1F1B schedule)."""
    g = a.gpus_per_node
    if c.tp * c.cp * c.dp * c.pp <= g:
        return a.intra_node_gbps * 1e9
    return min(a.intra_node_gbps, a.inter_node_gbps / min(g, c.tp * c.cp * c.dp)) * 1e9


def p2p_seconds_per_micro_batch(recipe: "Recipe", c: Candidate, a: Assumptions) -> float:
    """A stage's pipeline traffic per micro-batch: the activations (micro_batch x seq_len x hidden in the
    residual stream's dtype; a CP rank's chunk, SP: its TP rank's shard of it) sent forward and their gradient
    sent back, at `p2p_bandwidth`. DeepSpeed's pipeline engine sends and receives blocking, so this is not
    overlapped with compute."""
    if c.pp == 1:
        return 0.0
    m = recipe.model
    activation = (tokens_per_rank(recipe, c) // (c.tp if c.sp else 1) * m.hidden_size
                  * precision_of(m.precision).residual)
    return 2 * activation / p2p_bandwidth(c, a)


def _peak_rate(recipe: "Recipe", gpu: Gpu, peak_tflops: float | None) -> float:
    """FLOP/s the matmuls of this precision can reach at best on one GPU."""
    if recipe.model.precision == "fp32":
        return gpu.tf32_tflops * 1e12
    return (peak_tflops or gpu.bf16_tflops) * 1e12


def tp_seconds_per_micro_batch(recipe: "Recipe", c: Candidate, a: Assumptions, stage: int) -> float:
    """A stage's TP traffic per micro-batch: two all-reduces of a rank's (tokens, H) per block forward, two in
    backward, two more when the forward is recomputed (TP ranks are adjacent: stride 1).

    Sequence parallelism moves the same volume (each all-reduce becomes an all-gather before the column-parallel
    GEMM and a reduce-scatter after the row-parallel one); the backward's extra all-gathers of qkv's and
    mlp_in's inputs for their weight gradients run asynchronously under the input-gradient GEMMs (megatron's
    LinearWithGradAccumulationAndAsyncCommunication) and are not counted. What SP adds is the fused loss's
    all-gather of the final features over TP on the last stage (a reduce-scatter of their gradient in backward).
    """
    if c.tp == 1:
        return 0.0
    m = recipe.model
    prec = precision_of(m.precision)
    tokens = tokens_per_rank(recipe, c)
    bw = group_bandwidth(c.tp, 1, a)
    reduces = m.n_blocks // c.pp * (6 if c.recompute else 4)
    seconds = reduces * 2 * (c.tp - 1) / c.tp * tokens * m.hidden_size * prec.compute / bw
    if c.sp and stage == c.pp - 1:
        seconds += 2 * (c.tp - 1) / c.tp * tokens * m.hidden_size * prec.weight / bw
    return seconds


def cp_seconds_per_micro_batch(recipe: "Recipe", c: Candidate, a: Assumptions) -> float:
    """A stage's context-parallel traffic per micro-batch (DeepSpeed-Ulysses): per block four all-to-alls forward
    (q, k, v from chunks to heads, the output back), four backward, four more when the forward is recomputed;
    each sends (cp - 1) / cp of a rank's (tokens / cp, H / tp) tensor in the attention dtype over the CP group
    (ranks tp apart: the rank order is TP, CP, DP, PP)."""
    if c.cp == 1:
        return 0.0
    m = recipe.model
    count = m.n_blocks // c.pp * (12 if c.recompute else 8)
    volume = (c.cp - 1) / c.cp * tokens_per_rank(recipe, c) * m.hidden_size / c.tp * precision_of(m.precision).attention
    return count * volume / group_bandwidth(c.cp, c.tp, a)


def step_time(recipe: "Recipe", c: Candidate, gpu: Gpu, a: Assumptions, peak_tflops: float | None = None) -> StepTime:
    """Estimated seconds per optimizer step: the slowest stage's compute, TP and CP communication and pipeline sends
    per micro-batch, times (grad_accum + pp - 1) micro-batch slots (1F1B), plus the data-parallel gradient exchange
    (over DP x CP: DeepSpeed's data group). A CP rank computes its chunk: 1 / cp of the tokens (attention: all L
    keys for its heads / cp)."""
    m = recipe.model
    f = flops_per_token(recipe, c.recompute)
    tokens = tokens_per_rank(recipe, c)
    rate = _peak_rate(recipe, gpu, peak_tflops) * a.efficiency
    blocks = m.n_blocks // c.pp
    per_block = f.blocks_executed / m.n_blocks
    head = f.head_executed
    # bf16-mixed: the fused loss runs the head GEMMs with bf16 operands too (pipeline.head_loss_config).
    stage_flops = [tokens / c.tp * (blocks * per_block + (head if s == c.pp - 1 else 0.0)) for s in range(c.pp)]
    # Small micro-batches pay a fixed launch/framework cost per block that large ones amortise.
    micro_compute = max(stage_flops) / rate + blocks * a.block_overhead_s
    micro_tp = max(tp_seconds_per_micro_batch(recipe, c, a, s) for s in stages(c.pp))
    micro_cp = cp_seconds_per_micro_batch(recipe, c, a)
    micro_p2p = p2p_seconds_per_micro_batch(recipe, c, a)
    slot = micro_compute + micro_tp + micro_cp + micro_p2p
    backward = micro_compute * (2 + c.recompute) / (3 + c.recompute)  # matmul FLOPs: forward 1, backward 2 (+1)
    dp = dp_exchange(recipe, c, a, micro_compute - backward, backward)
    return StepTime(compute=c.grad_accum * micro_compute, tp_comm=c.grad_accum * micro_tp, dp_comm=dp.exposed,
                    bubble=(c.pp - 1) * slot, total=(c.grad_accum + c.pp - 1) * slot + dp.exposed,
                    p2p=c.grad_accum * micro_p2p, dp_hidden=dp.total - dp.exposed, cp_comm=c.grad_accum * micro_cp)


@dataclass(frozen=True)
class DpExchange:
    """A step's data-parallel traffic (seconds at the DP group's bandwidth): all of it, and what compute leaves
    exposed."""

    total: float
    exposed: float


def exposed_seconds(comm: float, window: float, edge: float) -> float:
    """What `comm` seconds of collectives issued in equal chunks over `window` seconds of compute leave exposed,
    `edge` being the chunks that no compute can hide (the last reduce bucket, which fills at the end of the
    backward; the first prefetch, which the first module waits for).

    The chunks run one after the other on the communication stream as the compute releases them (n = comm /
    edge chunks, chunk i at i / n of the window): the last one ends at max over i of i/n x window + (n - i + 1)
    x edge, linear in i, hence at the end of the window plus max(edge, comm - window x (1 - edge / comm)).
    """
    if comm <= 0.0:
        return 0.0
    edge = min(edge, comm)
    return max(edge, comm - window * (1.0 - edge / comm))


def dp_exchange(recipe: "Recipe", c: Candidate, a: Assumptions, forward: float = 0.0,
                backward: float = 0.0) -> DpExchange:
    """The data-parallel exchange of a step and what of it the forward (`forward` seconds of compute per
    micro-batch) and the backward (`backward`) hide, as DeepSpeed 0.19.8 schedules it.

    Volumes (ring collectives, `group_bandwidth`; p the most parameters a GPU of a stage holds, w their bytes):
    ZeRO-0 and BF16_Optimizer (bf16 weights under ZeRO-1 or in a pipeline) all-reduce the gradients once per step
    after the last backward, BF16_Optimizer then all-gathers the bf16 weights it updated; ZeRO-1 reduce-scatters
    the gradients once per step (in the last micro-batch's backward), ZeRO-2 in every micro-batch's backward, both
    all-gather the updated weights after the optimizer step; ZeRO-3 all-gathers the weights in every
    micro-batch's forward and again in its backward, and reduce-scatters the gradients in every backward.

    Overlap (`memory.overlaps_reduction`: parallel.zero_overlap_comm, ZeRO-1/2/3, no pipeline, no
    BF16_Optimizer): each reduce-scatter runs bucket by bucket (parallel.zero_reduce_bucket_size elements) on
    a side stream during the backward that produces the gradients, and leaves `exposed_seconds(reduction,
    backward, one bucket)` exposed: at least the last bucket, and whatever exceeds the backward's compute.
    ZeRO-3 prefetches the next modules' weights (parallel.zero_prefetch_bucket_size elements, 0: no prefetch)
    on the same side stream: the forward's gathers leave `exposed_seconds(gathers, forward, one prefetch
    bucket)`, the backward's gathers and reductions together `exposed_seconds(both, backward, a prefetch bucket
    + a reduce bucket)`. Without overlap, and always for the weight all-gathers after the optimizer step and
    the engine's all-reduce, the whole exchange adds to the step. Only compute hides communication here: the
    TP all-reduces and pipeline sends are not counted as a window, nor do they slow the DP collectives down.
    """
    n = c.data_group_size  # DeepSpeed's data group: DP x CP
    if n == 1:
        return DpExchange(0.0, 0.0)
    m = recipe.model
    w = precision_of(m.precision).weight
    p = max(stage_params(m, c.tp, c.pp, s).total for s in stages(c.pp))  # middle stages are alike
    # A data group holds ranks tp apart (rank = tp_rank + TP (cp_rank + CP (dp_rank + DP pp_rank))).
    bw = group_bandwidth(n, c.tp, a)
    frac = (n - 1) / n

    def seconds(elements: float, bytes_: int) -> float:  # a reduce-scatter or all-gather
        return frac * elements * bytes_ / bw

    if c.zero_stage == 0 or uses_bf16_optimizer(m.precision, c):
        grad_bytes = 4 if (w == 4 or c.zero_stage == 1) else 2
        total = 2 * seconds(p, grad_bytes)  # all-reduce of the gradients
        if w == 2 and (c.zero_stage == 1 or c.pp > 1):
            total += seconds(p, w)  # BF16_Optimizer all-gathers the bf16 weights its DP partitions updated
        return DpExchange(total, total)
    overlap = overlaps_reduction(recipe, c)
    reduce, bucket = seconds(p, w), seconds(min(p, recipe.parallel.zero_reduce_bucket_size), w)
    if c.zero_stage in (1, 2):
        reductions = 1 if c.zero_stage == 1 else c.grad_accum
        gather = seconds(p, w)  # the updated weights, after the step
        exposed = exposed_seconds(reduce, backward, bucket) if overlap else reduce
        return DpExchange(reductions * reduce + gather, reductions * exposed + gather)
    gathers = seconds(p, w)  # ZeRO-3: once for the forward, once for the backward, per micro-batch
    prefetch = seconds(min(p, recipe.parallel.zero_prefetch_bucket_size), w)
    total = c.grad_accum * (2 * gathers + reduce)
    if not overlap:
        return DpExchange(total, total)
    if prefetch == 0.0:  # no prefetch: each module waits for its own gather
        per_micro = 2 * gathers + exposed_seconds(reduce, backward, bucket)
    else:
        per_micro = (exposed_seconds(gathers, forward, prefetch)
                     + exposed_seconds(gathers + reduce, backward, prefetch + bucket))
    return DpExchange(total, c.grad_accum * per_micro)


def bubble_fraction(pp: int, grad_accum: int) -> float:
    """Idle fraction of DeepSpeed's 1F1B pipeline schedule: (pp - 1) / (grad_accum + pp - 1)."""
    return (pp - 1) / (grad_accum + pp - 1)
