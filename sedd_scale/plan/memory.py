"""Memory per GPU of a layout: parameters per stage, model states, activations, the fused loss, per phase."""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sedd_scale.layout import Layout
from sedd_scale.model.config import SIGMA_FEATURES, ModelConfig
from sedd_scale.plan.hardware import (
    ALLREDUCE_BUCKET_SIZE,
    LOSS_CHUNK_BYTES,
    MAX_LIVE_PARAMETERS,
    PARAM_PERSISTENCE_THRESHOLD,
    Assumptions,
)

if TYPE_CHECKING:  # the planner reads recipes; the recipe CLI imports the planner
    from sedd_scale.config import Recipe


@dataclass(frozen=True)
class Candidate(Layout):
    """A layout (all batch arithmetic is `Layout`'s) and the activation-checkpointing choice."""

    recompute: bool = False

    @classmethod
    def of(cls, tp: int, pp: int, dp: int, zero_stage: int, micro_batch: int, grad_accum: int,
           recompute: bool, *, cp: int = 1, sp: bool = False) -> "Candidate":
        """The candidate with these degrees (world size and global batch follow)."""
        return cls(tp * cp * pp * dp, tp, pp, dp, zero_stage, micro_batch, micro_batch * dp * grad_accum, grad_accum,
                   recompute, cp=cp, sp=sp)

    def describe(self) -> str:
        """Short form for tables: TP (+SP) x CP x PP x DP, ZeRO, micro batch, recompute."""
        cp = f" CP{self.cp}" if self.cp > 1 else ""
        return (f"TP{self.tp}{'+SP' if self.sp else ''}{cp} PP{self.pp} DP{self.dp} ZeRO-{self.zero_stage} "
                f"micro {self.micro_batch} accum {self.grad_accum} recompute {'on' if self.recompute else 'off'}")


def candidate_of(recipe: "Recipe", layout: Layout) -> Candidate:
    """The recipe's own choice under a resolved layout."""
    return Candidate(**dataclasses.asdict(layout), recompute=recipe.model.activation_checkpointing)


# ---------------------------------------------------------------------------------------------
# Parameters.
@dataclass(frozen=True)
class StageParams:
    """Parameter counts one GPU of a pipeline stage holds (its TP shard), before ZeRO partitioning."""

    total: int
    small: int  # in tensors of at most PARAM_PERSISTENCE_THRESHOLD elements (kept whole by ZeRO-3)
    largest_module: int  # the most held by one module (DeepSpeed's "largest layer")


def _tensors(m: ModelConfig, tp: int, pp: int, stage: int) -> list[tuple[int, bool, int]]:
    """(numel, is a matmul weight, module id) of each parameter on one GPU of `stage`."""
    return list(_tensors_of(m.hidden_size, m.cond_dim, m.mlp_ratio, m.padded_vocab(tp) // tp, m.n_blocks, tp, pp,
                            stage))


def _shape_key(m: ModelConfig, tp: int) -> tuple[int, int, int, int, int]:
    """What the parameter shapes depend on (ModelConfig itself is unhashable): the search calls these often."""
    return m.hidden_size, m.cond_dim, m.mlp_ratio, m.padded_vocab(tp) // tp, m.n_blocks


@functools.lru_cache(maxsize=4096)
def _tensors_of(h: int, c: int, r: int, v: int, n_blocks: int, tp: int, pp: int,
                stage: int) -> tuple[tuple[int, bool, int], ...]:
    out: list[tuple[int, bool, int]] = []
    if stage == 0:
        out += [(v * h, False, 0),  # vocab-parallel embedding: a lookup table
                (SIGMA_FEATURES * c, True, 1), (c, False, 1), (c * c, True, 2), (c, False, 2)]
    per = n_blocks // pp
    for b in range(stage * per, (stage + 1) * per):
        mod = 10 * (b + 1)
        out += [(h, False, mod), (h, False, mod + 1),  # norm1, norm2 (replicated)
                (3 * h * h // tp, True, mod + 2),  # attn_qkv, column-parallel, no bias
                (h * h // tp, True, mod + 3),  # attn_out, row-parallel, no bias
                (r * h * h // tp, True, mod + 4), (r * h // tp, False, mod + 4),  # mlp_in + its sharded bias
                (r * h * h // tp, True, mod + 5), (h, False, mod + 5),  # mlp_out + its replicated bias
                (6 * h * c, True, mod + 6), (6 * h, False, mod + 6)]  # adaLN modulation (replicated)
    if stage == pp - 1:
        out += [(h, False, -1), (2 * h * c, True, -2), (2 * h, False, -2),  # final norm, adaLN
                (v * h, True, -3), (v, False, -3)]  # the head shard and its bias
    return tuple(out)


def stage_params(m: ModelConfig, tp: int, pp: int, stage: int) -> StageParams:
    """Parameters on one GPU of pipeline stage `stage` (DeepSpeed splits the blocks evenly)."""
    return _stage_params(*_shape_key(m, tp), tp, pp, stage)


@functools.lru_cache(maxsize=4096)
def _stage_params(h: int, c: int, r: int, v: int, n_blocks: int, tp: int, pp: int, stage: int) -> StageParams:
    tensors = _tensors_of(h, c, r, v, n_blocks, tp, pp, stage)
    modules: dict[int, int] = {}
    for n, _, mod in tensors:
        modules[mod] = modules.get(mod, 0) + n
    return StageParams(total=sum(n for n, _, _ in tensors),
                       small=sum(n for n, _, _ in tensors if n <= PARAM_PERSISTENCE_THRESHOLD),
                       largest_module=max(modules.values()))


# ---------------------------------------------------------------------------------------------
# Memory.
@dataclass(frozen=True)
class Precision:
    """Byte sizes of what a block saves under model.precision (LayerNorms always keep fp32 tensors)."""

    weight: int  # parameters (and DeepSpeed's low-precision gradients)
    residual: int  # the residual stream between blocks (what activation checkpointing saves)
    linear_in: int  # the inputs of qkv and mlp_in, cast to the weights' dtype before the megatron linears
    attention: int  # qkv, rotated q and k, SDPA's output, attn_out's output (no biases)
    mlp: int  # mlp_in's output and GELU's, mlp_out's output: an fp32 bias promotes a bf16 product to fp32
    compute: int  # the matmul products (what TP all-reduces)


def precision_of(name: str) -> Precision:
    """fp32: all fp32. bf16: bf16 weights and tensors. bf16-mixed: fp32 weights, stream and biased outputs,
    bf16 products of the bias-free matmuls (autocast casts inside megatron's linears, which save their fp32 inputs)."""
    return _PRECISIONS[name]


_PRECISIONS = {"fp32": Precision(4, 4, 4, 4, 4, 4), "bf16": Precision(2, 2, 2, 2, 2, 2),
               "bf16-mixed": Precision(4, 4, 4, 2, 4, 2)}


def block_saved_bytes_per_token(m: ModelConfig, tp: int, device: str = "cuda", sp: bool = False,
                                cp: int = 1) -> float:
    """Bytes one block saves for backward per token this rank holds (its input included), without checkpointing.

    Replicated over TP: each LayerNorm keeps its fp32 input, the normalised and the scaled tensor
    (3 x 4 B x H, twice); the qkv and MLP inputs; the two branch outputs (each kept by its gate's
    product). Sharded: qkv (3 H), the rotated q and k and SDPA's output (H each: flash keeps no L x L
    matrix, and its output is laid out so that the head merge is a view), mlp_in's output and GELU's
    (mlp_ratio x H each). With dropout each branch keeps its mask: 1 B on CUDA, a whole tensor on CPU.

    Sequence parallelism (`sp`) splits the replicated part over TP too: its tensors live on a sequence shard,
    and the column-parallel qkv and mlp_in save their local input shard (megatron gathers it, forward and again in
    backward, into a buffer it keeps: `sp_gather_buffer_per_token`, not counted here). Context parallelism (`cp`
    > 1, Ulysses) holds L / cp positions per rank (the caller's token count); per position it trades qkv's output,
    which the all-to-alls copy and free, for v's and the output's all-to-all copies (v whole heads of the
    sequence, kept by SDPA; the output back, kept by attn_out): one H / tp of the attention dtype fewer.
    """
    p = precision_of(m.precision)
    h, r = m.hidden_size, m.mlp_ratio
    replicated = 2 * 3 * 4 + 2 * p.linear_in + p.attention + p.mlp
    if m.dropout > 0:
        replicated += 2 if device == "cuda" else p.attention + p.mlp
    attention = 6 if cp == 1 else 5
    return h * (replicated / (tp if sp else 1) + (attention * p.attention + 2 * r * p.mlp) / tp)


def sp_gather_buffer_per_token(m: ModelConfig) -> float:
    """Bytes per token of the CP chunk of megatron's global memory buffer under SP: the column-parallel layers
    all-gather their input (forward, and again in backward) into one (tokens, H) buffer of the linear-input dtype,
    allocated at the first forward and kept for the whole run (measured)."""
    return m.hidden_size * precision_of(m.precision).linear_in


def _backward_transient_per_token(m: ModelConfig, tp: int, cp: int = 1) -> float:
    """The widest gradients of a block's backward, the MLP's (measured: (mlp_ratio + 2) x H / tp of its dtype);
    under CP the attention's all-to-all buffers (a permuted copy and the received tensor, H / tp each). (SP
    re-gathers qkv's and mlp_in's inputs for their weight gradients into megatron's persistent buffer:
    `sp_gather_buffer_per_token`.)"""
    p = precision_of(m.precision)
    extra = m.hidden_size * (m.mlp_ratio + 2) * p.mlp / tp
    if cp > 1:
        extra += 2 * m.hidden_size * p.attention / tp
    return extra


def tokens_per_rank(recipe: "Recipe", c: Layout) -> int:
    """Positions of a micro-batch one rank holds through the blocks (its CP chunk; SP's shards are counted
    in the per-token bytes)."""
    return c.micro_batch * recipe.data.seq_len // c.cp


def _autocast_copies(m: ModelConfig, pp: int, stage: int) -> int:
    """bf16-mixed: bytes of the bf16 weight copies autocast makes for the nn.Linear layers (adaLN, noise
    embedding) and their matmuls save for backward (megatron's linears save their fp32 weights instead)."""
    if m.precision != "bf16-mixed":
        return 0
    c, h = m.cond_dim, m.hidden_size
    n = (m.n_blocks // pp) * 6 * h * c
    n += (SIGMA_FEATURES * c + c * c) if stage == 0 else 0
    n += 2 * h * c if stage == pp - 1 else 0
    return 2 * n


@dataclass(frozen=True)
class Line:
    """One row of a memory table: bytes alive at each phase's peak (0 where the item is not alive)."""

    label: str
    resident: float  # between steps
    forward: float  # the end of a forward pass (from the second micro-batch on, gradients exist)
    backward: float  # the backward pass's peak
    step: float  # after the last backward: DP gradient reduction and the optimizer step (activations freed)
    note: str = ""
    validation: float = 0.0  # the ELBO evaluation with the EMA weights (every train.eval_every steps)
    sampling: float = 0.0  # the example samples after each evaluation (and at the end of training)

    @property
    def most(self) -> float:
        """The most this item holds in any phase."""
        return max(getattr(self, name) for name in PHASES)


TRAINING_PHASES = ("forward", "backward", "step")  # the phases of a training step
EVAL_PHASES = ("validation", "sampling")  # between steps, with the EMA weights loaded (`train.ema.EMA.applied`)
PHASES = TRAINING_PHASES + EVAL_PHASES  # the phases a peak can fall in (resident <= each)
# Sequences the trainer samples: 2 after each evaluation (Trainer.fit), 3 at the end (train.main); the larger.
SAMPLE_BATCH = 3
# float64 elements of the sampler's draw buffer per chunk of positions (diffusion.sampling._CHUNK).
SAMPLER_CHUNK = {"cuda": 1 << 26, "cpu": 1 << 22}


@dataclass(frozen=True)
class StageMemory:
    """Memory of one GPU of one pipeline stage."""

    stage: int
    params: StageParams
    lines: tuple[Line, ...]
    activations_recompute: float  # the activations (held + the backward's extra) with checkpointing on
    activations_no_recompute: float  # ... and off
    in_flight: int

    def item(self, label: str) -> Line:
        """The line called `label`."""
        return next(line for line in self.lines if line.label == label)

    def phase(self, name: str) -> float:
        """Tensor bytes at the peak of phase `name` (resident, forward, backward or step)."""
        return sum(getattr(line, name) for line in self.lines)

    @functools.cached_property
    def peak_phase(self) -> str:
        """The phase with the most memory."""
        return max(PHASES, key=self.phase)

    @functools.cached_property
    def peak(self) -> float:
        """The tensor peak over training, validation and sampling (what torch.cuda.max_memory_allocated reports)."""
        return self.phase(self.peak_phase)

    @property
    def training_peak(self) -> float:
        """The tensor peak of a training step alone (what a run without validation reaches)."""
        return max(self.phase(name) for name in TRAINING_PHASES)


def uses_bf16_optimizer(precision: str, c: Candidate) -> bool:
    """Whether DeepSpeed wraps the optimizer in BF16_Optimizer: bf16 weights under ZeRO-1 (the engine's fp32
    gradient accumulation) or ZeRO-0 in a pipeline. It all-reduces the gradients after the backward."""
    return precision == "bf16" and (c.zero_stage == 1 or (c.zero_stage == 0 and c.pp > 1))


def overlaps_reduction(recipe: "Recipe", c: Candidate) -> bool:
    """Whether DeepSpeed reduces the gradients during the backward on a side stream (overlap_comm in effect): the
    recipe asks for it (parallel.zero_overlap_comm), a ZeRO optimizer runs (ZeRO-1/2/3, not BF16_Optimizer) and
    there is no pipeline (engine.zero_optimization passes overlap_comm false with pp > 1)."""
    return (recipe.parallel.zero_overlap_comm and c.pp == 1 and c.zero_stage > 0
            and not uses_bf16_optimizer(recipe.model.precision, c))


def reduce_buckets(recipe: "Recipe", c: Candidate) -> int:
    """Reduce buckets of parallel.zero_reduce_bucket_size elements a ZeRO optimizer holds (0 without one).

    ZeRO-1/2 (DeepSpeedZeroOptimizer.setup_buckets): the bucket gradients are copied into with
    contiguous_gradients (without it, the flat copy made to reduce a bucket, about as large), and a second one
    with overlap_comm in effect, filled while the first is reduced. ZeRO-3 allocates one bucket either way.
    """
    if c.zero_stage == 0 or uses_bf16_optimizer(recipe.model.precision, c):
        return 0
    if c.zero_stage == 3:
        return 1
    return 2 if overlaps_reduction(recipe, c) and recipe.parallel.zero_contiguous_gradients else 1


@functools.lru_cache(maxsize=16384)
def _dp_chunks(key: tuple[int, int, int, int, int], tp: int, pp: int, stage: int, dp: int) -> tuple[int, int]:
    """(sum, max) over the stage's tensors of ceil(numel / dp): the padded length of a per-tensor DP shard."""
    chunks = [math.ceil(n / dp) for n, _, _ in _tensors_of(*key, tp, pp, stage)]
    return sum(chunks), max(chunks)


def _states(recipe: "Recipe", c: Candidate, stage: int, sp: StageParams) -> list[Line]:
    """Weights, gradients, optimizer state, EMA and DeepSpeed's buffers for one GPU of `stage`."""
    m = recipe.model
    # DeepSpeed's data group is DP x CP: ZeRO partitions, the EMA shards and the gradient exchange span it.
    w, p, d = precision_of(m.precision).weight, sp.total, c.data_group_size
    bucket = recipe.parallel.zero_reduce_bucket_size
    n_buckets = reduce_buckets(recipe, c)
    buckets = n_buckets * bucket  # elements
    part = p / d
    fp32 = w == 4
    bf16_optimizer = uses_bf16_optimizer(m.precision, c)
    # Gradients exist during a forward pass only from the second micro-batch of a step on (and
    # always on pipeline stages, whose forwards and backwards interleave).
    later = c.grad_accum > 1 or c.pp > 1
    # No optimizer temporaries at the step: fused AdamW (CPU and CUDA) updates in place, and the
    # non-finite guard reads the global gradient norm (optim.py).
    # The engine's DP all-reduce (ZeRO-0, BF16_Optimizer) flattens fp32 gradients up to its own bucket size.
    all_reduce = 4 * min(p, ALLREDUCE_BUCKET_SIZE) if d > 1 else 0.0

    def grads(bytes_: float, at_step: float = 0.0) -> tuple[float, float, float, float]:
        return 0.0, bytes_ if later else 0.0, bytes_, bytes_ + at_step

    lines: list[Line]
    if fp32 and c.zero_stage == 0:  # plain torch AdamW
        lines = [Line("weights", 4 * p, 4 * p, 4 * p, 4 * p, "fp32"),
                 Line("gradients", *grads(4 * p), "fp32, whole"),
                 Line("optimizer", 8 * p, 8 * p, 8 * p, 8 * p, "Adam m, v (fp32), whole"),
                 Line("buffers", 0.0, 0.0, 0.0, all_reduce, "DP all-reduce bucket")]
    elif c.zero_stage in (1, 2) and (fp32 or c.zero_stage == 2):  # DeepSpeedZeroOptimizer
        # ZeRO-1 keeps whole gradients and its reduce bucket through the accumulation; ZeRO-2 keeps
        # a gradient partition and allocates the bucket for each backward only. Both form the flat
        # fp32 gradient partition at the step. Each bucket has reduce_bucket_size elements, whatever
        # the model (two with overlap_comm); with accumulation ZeRO-1's outlive the last backward until
        # the partition is formed (measured), so the step holds the larger of the two.
        if c.zero_stage == 1:
            g, note = grads(4 * p), "fp32, whole"
            buf = (0.0, 4 * buckets if later else 0.0, 4 * buckets, max(4 * buckets if later else 0.0, 4 * part))
        else:
            g, note = grads(w * part, 4 * part), f"{'fp32' if fp32 else 'bf16'} partition /DP"
            buf = (0.0, 0.0, w * buckets, 0.0)
        lines = [Line("weights", w * p, w * p, w * p, w * p, f"{'fp32' if fp32 else 'bf16'} (flat)"),
                 Line("gradients", *g, note),
                 Line("optimizer", 12 * part, 12 * part, 12 * part, 12 * part, "fp32 master + Adam m, v, /DP"),
                 Line("buffers", *buf, f"ZeRO reduce bucket{'s' if n_buckets > 1 else ''} ({n_buckets} x "
                      f"{bucket:.3g} elements{', overlap_comm' if n_buckets > 1 else ''})")]
    elif c.zero_stage == 3:  # DeepSpeedZeroOptimizer_Stage3
        # Small tensors stay whole on every rank; the rest is gathered per module for forward and
        # backward and kept while reused within max_reuse_distance (the whole stage here), up to
        # max_live_parameters elements. One DP rank's partition is the whole tensor: nothing to gather.
        whole = 0.0 if d == 1 else w * sp.small
        gathered = 0.0 if d == 1 else w * min(p - sp.small, MAX_LIVE_PARAMETERS)
        resident = w * part + whole
        g = w * part  # a persistent partition buffer
        lines = [Line("weights", resident, resident + gathered, resident + gathered, resident,
                      "partition /DP + small tensors whole + gathered"),
                 Line("gradients", g, g, g, g + (4 * part if not fp32 else 0.0), "partition /DP"),
                 Line("optimizer", 12 * part, 12 * part, 12 * part, 12 * part, "fp32 master + Adam m, v, /DP"),
                 Line("buffers", w * buckets, w * buckets, w * buckets, w * buckets,
                      f"ZeRO reduce bucket ({bucket:.3g} elements, persistent)")]
    elif bf16_optimizer:
        # BF16_Optimizer: fp32 master and moments partitioned over DP, a whole flat gradient
        # accumulator (fp32 under ZeRO-1, engine.deepspeed_config; bf16 at ZeRO-0 in a pipeline)
        # and the bf16 gradients of the backward passes.
        acc = 4 if c.zero_stage == 1 else 2
        lp = grads(2 * p, 4 * part if acc == 2 else 0.0)
        lines = [Line("weights", 2 * p, 2 * p, 2 * p, 2 * p, "bf16 (flat)"),
                 Line("gradients", acc * p, acc * p + lp[1], acc * p + lp[2], acc * p + lp[3],
                      f"{'fp32' if acc == 4 else 'bf16'} accumulator + bf16, whole"),
                 Line("optimizer", 12 * part, 12 * part, 12 * part, 12 * part, "fp32 master + Adam m, v, /DP"),
                 Line("buffers", 0.0, 0.0, 0.0, all_reduce, "DP all-reduce bucket")]
    else:  # bf16 weights, ZeRO-0, no pipeline: FP16_UnfusedOptimizer in bf16 (whole fp32 masters)
        lines = [Line("weights", 2 * p, 2 * p, 2 * p, 2 * p, "bf16"),
                 Line("gradients", *grads(2 * p, 4 * p), "bf16, whole (+ fp32 copies at the step)"),
                 Line("optimizer", 12 * p, 12 * p, 12 * p, 12 * p, "fp32 master + Adam m, v, whole")]
    ema = 4 * _dp_chunks(_shape_key(m, c.tp), c.tp, c.pp, stage, d)[0]  # per tensor, padded
    lines.insert(3, Line("EMA", ema, ema, ema, ema, "fp32, /DP"))
    return lines


def _activation_lines(recipe: "Recipe", c: Candidate, stage: int,
                      a: Assumptions) -> tuple[list[Line], float, float, int]:
    """Activation, fused-loss and pipeline-buffer lines for one GPU of `stage`; the activation bytes (held +
    the backward's extra) with checkpointing on and off; the micro-batches in flight."""
    m = recipe.model
    prec = precision_of(m.precision)
    tokens = tokens_per_rank(recipe, c)  # CP: this rank's chunk of each sequence
    stream = tokens // (c.tp if c.sp else 1)  # SP: the residual stream between blocks is a sequence shard
    h = m.hidden_size
    blocks = m.n_blocks // c.pp
    in_flight = min(c.pp - stage, c.grad_accum)
    full = tokens * block_saved_bytes_per_token(m, c.tp, a.device, c.sp, c.cp)
    grads = tokens * _backward_transient_per_token(m, c.tp, c.cp)
    autocast = _autocast_copies(m, c.pp, stage)

    def activations(recompute: bool) -> tuple[float, float]:
        """(held at the end of forward, extra at the backward peak)."""
        if recompute:  # each block keeps its input; backward recomputes one block at a time
            return in_flight * blocks * stream * h * prec.residual, full + grads
        # (bf16-mixed: autocast's bf16 copies of the nn.Linear weights are saved too)
        return in_flight * (blocks * full + autocast), grads

    held, extra = activations(c.recompute)
    lines = [Line("activations", 0.0, held, held, 0.0,
                  f"micro {c.micro_batch} x {in_flight} in flight, saved for backward"),
             Line("backward extra", 0.0, 0.0, extra, 0.0,
                  "a recomputed block + its gradients" if c.recompute else "a block's widest gradients")]
    if stage == c.pp - 1:
        norm, loss_held, loss_chunks = _loss_bytes(recipe, c, tokens)
        # The loss's gradients go to the head and the final norm first in backward.
        lines.append(Line("fused loss", 0.0, norm + loss_held + loss_chunks, norm, 0.0,
                          "final norm, head gradients held to backward, chunk logits"
                          + (", SP: the gathered features" if c.sp else "")))
    if c.sp:
        gather = tokens * sp_gather_buffer_per_token(m)
        lines.append(Line("SP gather buffer", gather, gather, gather, gather,
                          "megatron's all-gather buffer of the column-parallel inputs (kept)"))
    if c.pp > 1:
        # DeepSpeed's pipeline engine (measured on PP 2): the first stage keeps its gradient receive
        # buffer; later stages also an activation receive buffer and, per pipe buffer, the stage
        # output (the last stage never clears it). During the pass the outputs of the in-flight
        # micro-batches wait for their backward (no op of this stage saves them).
        unit = stream * h * prec.residual  # SP: each TP rank sends its sequence shard
        buffers = max(2, min(c.pp - stage, c.grad_accum))  # TrainSchedule.num_pipe_buffers
        kept = unit if stage == 0 else (2 + buffers) * unit
        waiting = kept + (in_flight * unit if stage < c.pp - 1 else 0.0)
        lines.append(Line("pipeline buffers", kept, waiting, waiting, kept, "received activations and gradients, "
                          "stage outputs"))
    on, off = (sum(activations(r)) for r in (True, False))
    return lines, on, off, in_flight


def _loss_chunk(n_local: int) -> int:
    """Tokens per chunk of the fused loss on a shard projecting n_local entries (HeadLossConfig.chunk_rows)."""
    return max(1, LOSS_CHUNK_BYTES // (n_local * 4))


def _loss_bytes(recipe: "Recipe", c: Candidate, tokens: int) -> tuple[float, float, float]:
    """(final norm's saved tensors, loss gradients held until backward, chunk temporaries) on the last stage."""
    m = recipe.model
    w = precision_of(m.precision).weight  # the features are cast to the head's dtype
    h = m.hidden_size
    v_local = m.padded_vocab(c.tp) // c.tp
    n_local = min(v_local, m.num_tokens)  # real tokens this shard projects (upper bound)
    projected = tokens  # worst case: every token masked (t near 1)
    chunk = min(_loss_chunk(n_local), projected)
    # SP: the final LayerNorm runs on a sequence shard; the loss gathers the features over TP (alive through the
    # forward's chunks) and holds the gathered features' gradient (backward reduce-scatters it). CP: `tokens` is
    # this rank's chunk, which it scores alone.
    norm = tokens * h * 12 / (c.tp if c.sp else 1)  # final LayerNorm: fp32 input, normalised, scaled
    held = tokens * h * w + v_local * h * w + v_local * w  # d hidden, d weight, d bias
    # During the last chunk: the fp32 weight-gradient accumulator and a matmul's fp32 product of
    # that size (the accumulator is the held gradient when the head is fp32), the chunk's logits and
    # their copy for the gradient (fp32), its bf16 cast for bf16 heads, and the projected tokens'
    # hidden rows and their fp32 gradients.
    chunks = (v_local * h * 4 * (2 if w == 2 else 1) + 2 * chunk * n_local * 4 + (chunk * n_local * 2 if w == 2 else 0)
              + projected * h * (4 + w) + (tokens * h * w if c.sp else 0))
    return norm, held, chunks


def _eval_forward_per_token(m: ModelConfig, tp: int, sp: bool = False) -> float:
    """Bytes per token alive inside a block's forward without autograd (evaluation, sampling): the stream in
    and out, the LayerNorm's fp32 output and its modulated cast, and the MLP's hidden before and after GELU
    (SP: the stream and the norm on a sequence shard, mlp_in's input gathered)."""
    p = precision_of(m.precision)
    return m.hidden_size * ((2 * p.residual + 4) / (tp if sp else 1) + p.linear_in + 2 * m.mlp_ratio * p.mlp / tp)


def _eval_lines(recipe: "Recipe", c: Candidate, stage: int, a: Assumptions) -> list[Line]:
    """What validation and sampling add to the states between steps, for one GPU of `stage`.

    Both run inside `EMA.applied` (sedd_scale/train/ema.py), which (1) all-gathers every DP rank's flat
    fp32 shadow into one buffer, 4 B x dp x sum(ceil(n / dp)), alive until the weights are restored, and
    forms each whole average as a copy (a reshape of a column slice of that buffer: the largest tensor's
    4 B x dp x ceil(n / dp) at the worst moment); without DP the gather is a view and nothing is copied;
    under ZeRO-3 every rank loads its own partition and nothing is gathered; (2) clones every parameter
    (the ZeRO-3 partition) in its own dtype to restore it afterwards. The bf16 weights of a DP run thus
    take 4 + 2 = 6 B per parameter of the stage on top of the training states.

    Validation then runs forward passes of micro_batch x seq_len tokens without autograd, the fused loss
    without its gradients on the last stage (final norm, the projected hidden rows, a chunk's logits).
    Sampling (`Trainer.samples`, SAMPLE_BATCH x seq_len tokens) forms full-vocabulary log-scores: on the
    last stage the head's raw output and two fp32 copies inside `to_log_score`, gathered over TP into
    (SAMPLE_BATCH, seq_len, padded vocabulary) fp32, which a pipeline broadcasts to every stage; then the
    sampler's step copies the unpadded columns (when the vocabulary is padded) and draws chunk by chunk
    in float64 (`diffusion.sampling._CHUNK` elements at most).
    """
    m = recipe.model
    w = precision_of(m.precision).weight
    out_bytes = precision_of(m.precision).compute  # the head's raw output (autocast and bf16 heads give bf16)
    d = c.data_group_size  # the EMA shards over DP x CP
    padded, largest = _dp_chunks(_shape_key(m, c.tp), c.tp, c.pp, stage, d)
    zero3 = c.zero_stage == 3
    gathered = 0.0 if zero3 or d == 1 else 4 * d * (padded + largest)
    saved = w * (padded if zero3 else stage_params(m, c.tp, c.pp, stage).total)
    last = stage == c.pp - 1
    h, s = m.hidden_size, recipe.data.seq_len
    v_pad, dim = m.padded_vocab(c.tp), m.vocab_size
    v_local = v_pad // c.tp

    # CP: a rank runs its chunk of every sequence; validation's fused loss scores the chunk, while sampling's
    # SEDD.forward gathers the head's raw output over CP into whole sequences before the log-scores.
    valid_tokens = c.micro_batch * s // c.cp
    validation = valid_tokens * _eval_forward_per_token(m, c.tp, c.sp)
    if last:  # the fused loss without gradients: final norm, projected rows (all, at worst), chunk logits
        n_local = min(v_local, m.num_tokens)
        chunk = min(_loss_chunk(n_local), valid_tokens)
        validation = max(validation, valid_tokens * h * (4 + w) + 2 * chunk * n_local * 4)

    sample_tokens = SAMPLE_BATCH * s
    full = sample_tokens * v_pad * 4  # the gathered fp32 log-scores (every stage of a pipeline receives them)
    sampling = sample_tokens // c.cp * _eval_forward_per_token(m, c.tp, c.sp)
    if last:  # raw output (CP: the chunk's and the gathered) + two fp32 copies
        chunk_out = sample_tokens // c.cp * v_local * out_bytes if c.cp > 1 else 0
        sampling = max(sampling, sample_tokens * v_local * (out_bytes + 8) + chunk_out)
        if c.tp > 1:  # gather_tp: this shard, the tp received shards and their concatenation
            sampling = max(sampling, sample_tokens * v_local * 4 + 2 * full)
    rows = min(max(1, SAMPLER_CHUNK[a.device] // dim), sample_tokens)
    sampling = max(sampling, full + (sample_tokens * dim * 4 if v_pad > dim else 0) + rows * dim * 8)
    return [Line("EMA gathered", 0.0, 0.0, 0.0, 0.0, "whole fp32 average (EMA.applied), + the largest tensor's copy",
                 validation=gathered, sampling=gathered),
            Line("weights saved", 0.0, 0.0, 0.0, 0.0, "a clone of the training weights (EMA.applied)",
                 validation=saved, sampling=saved),
            Line("evaluation", 0.0, 0.0, 0.0, 0.0, f"no-grad forward (micro {c.micro_batch}) / log-scores of "
                 f"{SAMPLE_BATCH} samples", validation=validation, sampling=sampling)]


def _between_steps(line: Line, c: Candidate) -> Line:
    """A training line during validation and sampling: what it holds between steps (ZeRO-3 gathers the weights
    for the evaluation's forward passes as for training's)."""
    held = line.forward if (c.zero_stage == 3 and line.label == "weights") else line.resident
    return Line(line.label, line.resident, line.forward, line.backward, line.step, line.note, held, held)


def stage_memory(recipe: "Recipe", c: Candidate, stage: int, a: Assumptions = Assumptions()) -> StageMemory:
    """Memory of one GPU of pipeline stage `stage` for candidate `c`."""
    m = recipe.model
    sp = stage_params(m, c.tp, c.pp, stage)
    act, on, off, in_flight = _activation_lines(recipe, c, stage, a)
    lines = [_between_steps(line, c) for line in _states(recipe, c, stage, sp) + act] + _eval_lines(recipe, c, stage, a)
    return StageMemory(stage, sp, tuple(lines), on, off, in_flight)


def stages(pp: int) -> list[int]:
    """The distinct kinds of stage: first, a middle one (all middle stages are alike), last."""
    return sorted({0, min(1, pp - 1), pp - 1})


def device_bytes(peak: float, a: Assumptions) -> float:
    """What a tensor peak needs of a GPU: the peak, allocator slack, CUDA context and NCCL."""
    return peak * (1.0 + a.fragmentation) + a.reserve_bytes
