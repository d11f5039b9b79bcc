"""Layout planner: per-GPU memory, pipeline bubble, step time and MFU of a recipe's layout, and a search.

Pure arithmetic over the recipe's sizes: no process group, no DeepSpeed or megatron-core import, so
the pre-flight check `python -m sedd_scale.config RECIPE --world-size N` prints it instantly for any
world size (a proposal search over the ~10^3 layouts of a 7B model at 1,024 GPUs takes under a second).

Memory per GPU is what this repository's training step allocates under DeepSpeed's defaults
(`engine.deepspeed_config` sets no bucket sizes), worked out from the code and checked against the
measured tensor peaks of real small runs (tests/test_planner.py, benchmarks/bench_planner.py):

* Model states (`_states`) follow the optimizer DeepSpeed picks for the precision and ZeRO stage:
  plain torch AdamW (fp32 weights, ZeRO-0), DeepSpeedZeroOptimizer (ZeRO-1/2: a flat fp32 master
  partition is always cloned, even for fp32 weights; ZeRO-3: partitioned weights, gradients and a
  persistent reduce bucket, small tensors whole, the stage's parameters gathered in forward and
  backward), BF16_Optimizer (bf16 weights under ZeRO-1 or a pipeline: fp32 master and Adam
  partitions, a whole gradient accumulator, fp32 under ZeRO-1, plus the bf16 gradients) and the bf16
  FP16_UnfusedOptimizer (bf16 weights, ZeRO-0: whole fp32 masters and moments).
* ZeRO-1/2/3 allocate their reduce bucket at `reduce_bucket_size` elements whatever the model size
  (5e8 by default: 2 GB in fp32, 1 GB in bf16).
* The EMA is fp32 and sharded over data parallelism: 4 B x params / DP (`sedd_scale/ema.py`).
* Activations are the tensors a block saves for backward (`block_saved_bytes_per_token`: the
  adaLN-modulated LayerNorms, qkv, rotary, SDPA, the GELU-tanh MLP), for every micro-batch in flight
  on the stage under DeepSpeed's 1F1B schedule (stage s of p holds min(p - s, grad_accum)); with
  activation checkpointing a block keeps only its input and one block is recomputed at a time.
* The fused loss (`sedd_scale/loss/vocab_parallel.py`) forms its gradients in the forward pass and
  holds them until backward: d hidden (tokens x H), d weight and d bias of the head shard; its chunk
  temporaries count projected tokens only (masked ones for absorb; the worst case, all masked, is
  used since every step draws new t).

Each item is given at four moments (`Line`): between steps, at the end of a forward pass, at the
backward peak and after the last backward (the DP gradient reduction and the optimizer step); the
peak is the largest of the last three sums. Not counted in the tensor peak: the CUDA context,
NCCL's buffers and allocator fragmentation, which `Assumptions` adds as a reserve, and small
per-sequence tensors (adaLN outputs, batch x 6H per block; rotary tables, L x head dim).

FLOPs are the matmuls actually done (`flops_per_token`): the input embedding is a lookup (none);
the head projects only the tokens the loss needs (the expected masked fraction for absorb) and only
the real vocabulary (the fused loss skips MASK and padding); attention is bidirectional over the
whole sequence; flash attention's backward recomputes the scores; activation checkpointing runs
each block's forward twice. Model FLOPs (for MFU) leave out both recomputations.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from sedd_scale.flops import projected_fraction, training_flops_per_token
from sedd_scale.model.config import SIGMA_FEATURES, ModelConfig

if TYPE_CHECKING:  # the planner reads recipes; config.py's CLI imports the planner
    from sedd_scale.config import Layout, Recipe

GB = 1e9  # memory is printed in decimal GB, the unit GPU memory is sold in


@dataclass(frozen=True)
class Gpu:
    """A GPU model: dense peak rates (TFLOP/s) and memory (bytes)."""

    name: str
    bf16_tflops: float  # dense bf16 tensor-core peak
    tf32_tflops: float  # dense TF32 tensor-core peak: fp32 recipes (engine.enable_tf32 turns TF32 on for CUDA GEMMs)
    memory_bytes: float


GPUS: dict[str, Gpu] = {  # NVIDIA datasheet figures
    "h100": Gpu("H100 SXM", 989.0, 494.5, 80 * GB),
    "a100": Gpu("A100 SXM 80GB", 312.0, 156.0, 80 * GB),
    "h200": Gpu("H200 SXM", 989.0, 494.5, 141 * GB),
}
DEFAULT_GPU = "h100"

# DeepSpeed 0.19's ZeRO defaults, which engine.deepspeed_config leaves alone (a test checks both).
REDUCE_BUCKET_SIZE = 500_000_000  # zero_optimization.reduce_bucket_size (elements)
PARAM_PERSISTENCE_THRESHOLD = 100_000  # stage3_param_persistence_threshold: smaller params stay whole
MAX_LIVE_PARAMETERS = 1_000_000_000  # stage3_max_live_parameters: gathered ZeRO-3 params at once
LOSS_CHUNK = 1024  # tokens per chunk of the fused loss (pipeline.head_loss_config's default)


@dataclass(frozen=True)
class Assumptions:
    """What the estimates assume beyond the recipe (printed with every plan)."""

    efficiency: float = 0.5  # fraction of the peak rate the matmuls sustain
    gpus_per_node: int = 8
    intra_node_gbps: float = 300.0  # NCCL bus bandwidth inside a node (NVLink), GB/s per GPU
    inter_node_gbps: float = 40.0  # across nodes (400 Gb/s InfiniBand per GPU), GB/s
    block_overhead_s: float = 1e-4  # launch and framework time per block per micro-batch (forward + backward)
    reserve_bytes: float = 2.5 * GB  # CUDA context and NCCL buffers, per GPU
    fragmentation: float = 0.05  # allocator slack on top of the tensor peak
    reduce_bucket_size: int = REDUCE_BUCKET_SIZE
    device: Literal["cuda", "cpu"] = "cuda"  # cpu: the kernels of the validation runs (dropout masks)

    def __post_init__(self):
        if not 0.0 < self.efficiency <= 1.0:
            raise ValueError(f"efficiency must be in (0, 1], got {self.efficiency}")
        if self.gpus_per_node < 1 or self.reduce_bucket_size < 1:
            raise ValueError("gpus_per_node and reduce_bucket_size must be >= 1")


@dataclass(frozen=True)
class Candidate:
    """A layout and activation-checkpointing choice for a recipe at a world size."""

    tp: int
    pp: int
    dp: int
    zero_stage: int
    micro_batch: int
    grad_accum: int
    recompute: bool

    @property
    def world_size(self) -> int:
        """tp * pp * dp."""
        return self.tp * self.pp * self.dp

    def describe(self) -> str:
        """Short form for tables: TP x PP x DP, ZeRO, micro batch, recompute."""
        return (f"TP{self.tp} PP{self.pp} DP{self.dp} ZeRO-{self.zero_stage} micro {self.micro_batch} "
                f"accum {self.grad_accum} recompute {'on' if self.recompute else 'off'}")


def candidate_of(recipe: "Recipe", layout: "Layout") -> Candidate:
    """The recipe's own choice under a resolved layout."""
    return Candidate(layout.tp, layout.pp, layout.dp, layout.zero_stage, layout.micro_batch, layout.grad_accum,
                     recipe.model.activation_checkpointing)


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
    h, c, r, v = m.hidden_size, m.cond_dim, m.mlp_ratio, m.padded_vocab(tp) // tp
    out: list[tuple[int, bool, int]] = []
    if stage == 0:
        out += [(v * h, False, 0),  # vocab-parallel embedding: a lookup table
                (SIGMA_FEATURES * c, True, 1), (c, False, 1), (c * c, True, 2), (c, False, 2)]
    per = m.n_blocks // pp
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
    return out


def stage_params(m: ModelConfig, tp: int, pp: int, stage: int) -> StageParams:
    """Parameters on one GPU of pipeline stage `stage` (DeepSpeed splits the blocks evenly)."""
    tensors = _tensors(m, tp, pp, stage)
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
    return {"fp32": Precision(4, 4, 4, 4, 4, 4), "bf16": Precision(2, 2, 2, 2, 2, 2),
            "bf16-mixed": Precision(4, 4, 4, 2, 4, 2)}[name]


def block_saved_bytes_per_token(m: ModelConfig, tp: int, device: str = "cuda") -> float:
    """Bytes one block saves for backward per token (its input included), without checkpointing.

    Replicated over TP: each LayerNorm keeps its fp32 input, the normalised and the scaled tensor
    (3 x 4 B x H, twice); the qkv and MLP inputs; the two branch outputs (each kept by its gate's
    product). Sharded: qkv (3 H), the rotated q and k and SDPA's output (H each: flash keeps no L x L
    matrix, and its output is laid out so that the head merge is a view), mlp_in's output and GELU's
    (mlp_ratio x H each). With dropout each branch keeps its mask: 1 B on CUDA, a whole tensor on CPU.
    """
    p = precision_of(m.precision)
    h, r = m.hidden_size, m.mlp_ratio
    replicated = 2 * 3 * 4 + 2 * p.linear_in + p.attention + p.mlp
    if m.dropout > 0:
        replicated += 2 if device == "cuda" else p.attention + p.mlp
    return h * (replicated + (6 * p.attention + 2 * r * p.mlp) / tp)


def _backward_transient_per_token(m: ModelConfig, tp: int) -> float:
    # The widest gradients of a block's backward, the MLP's (measured: (mlp_ratio + 2) x H / tp of its dtype).
    return m.hidden_size * (m.mlp_ratio + 2) * precision_of(m.precision).mlp / tp


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

    @property
    def most(self) -> float:
        """The most this item holds in any phase."""
        return max(self.forward, self.backward, self.step)


PHASES = ("forward", "backward", "step")  # the phases a peak can fall in (resident <= each)


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

    @property
    def peak_phase(self) -> str:
        """The phase with the most memory."""
        return max(PHASES, key=self.phase)

    @property
    def peak(self) -> float:
        """The tensor peak (what torch.cuda.max_memory_allocated would report)."""
        return self.phase(self.peak_phase)


def _states(m: ModelConfig, c: Candidate, stage: int, sp: StageParams, a: Assumptions) -> list[Line]:
    """Weights, gradients, optimizer state, EMA and DeepSpeed's buffers for one GPU of `stage`."""
    w, p, d = precision_of(m.precision).weight, sp.total, c.dp
    bucket = a.reduce_bucket_size
    part = p / d
    fp32 = w == 4
    bf16_optimizer = not fp32 and (c.zero_stage == 1 or (c.zero_stage == 0 and c.pp > 1))
    # Gradients exist during a forward pass only from the second micro-batch of a step on (and
    # always on pipeline stages, whose forwards and backwards interleave).
    later = c.grad_accum > 1 or c.pp > 1
    # No optimizer temporaries at the step: fused AdamW (CPU and CUDA) updates in place, and the
    # non-finite guard reads the global gradient norm (optim.py).
    all_reduce = 4 * min(p, bucket) if d > 1 else 0.0  # DP all-reduce of fp32 gradients flattens up to a bucket

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
        # fp32 gradient partition at the step. The bucket has reduce_bucket_size elements, whatever
        # the model; with accumulation ZeRO-1's outlives the last backward until the partition is
        # formed (measured), so the step holds the larger of the two.
        if c.zero_stage == 1:
            g, note = grads(4 * p), "fp32, whole"
            buf = (0.0, 4 * bucket if later else 0.0, 4 * bucket, max(4 * bucket if later else 0.0, 4 * part))
        else:
            g, note = grads(w * part, 4 * part), f"{'fp32' if fp32 else 'bf16'} partition /DP"
            buf = (0.0, 0.0, w * bucket, 0.0)
        lines = [Line("weights", w * p, w * p, w * p, w * p, f"{'fp32' if fp32 else 'bf16'} (flat)"),
                 Line("gradients", *g, note),
                 Line("optimizer", 12 * part, 12 * part, 12 * part, 12 * part, "fp32 master + Adam m, v, /DP"),
                 Line("buffers", *buf, f"ZeRO reduce bucket ({bucket:.3g} elements)")]
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
                 Line("buffers", w * bucket, w * bucket, w * bucket, w * bucket,
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
    ema = 4 * sum(math.ceil(n / d) for n, _, _ in _tensors(m, c.tp, c.pp, stage))  # per tensor, padded
    lines.insert(3, Line("EMA", ema, ema, ema, ema, "fp32, /DP"))
    return lines


def _activation_lines(recipe: "Recipe", c: Candidate, stage: int,
                      a: Assumptions) -> tuple[list[Line], float, float, int]:
    """Activation, fused-loss and pipeline-buffer lines for one GPU of `stage`; the activation bytes (held +
    the backward's extra) with checkpointing on and off; the micro-batches in flight."""
    m = recipe.model
    prec = precision_of(m.precision)
    tokens = c.micro_batch * recipe.data.seq_len
    h = m.hidden_size
    blocks = m.n_blocks // c.pp
    in_flight = min(c.pp - stage, c.grad_accum)
    full = tokens * block_saved_bytes_per_token(m, c.tp, a.device)
    grads = tokens * _backward_transient_per_token(m, c.tp)
    autocast = _autocast_copies(m, c.pp, stage)

    def activations(recompute: bool) -> tuple[float, float]:
        """(held at the end of forward, extra at the backward peak)."""
        if recompute:  # each block keeps its input; backward recomputes one block at a time
            return in_flight * blocks * tokens * h * prec.residual, full + grads
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
                          "final norm, head gradients held to backward, chunk logits"))
    if c.pp > 1:
        # DeepSpeed's pipeline engine (measured on PP 2): the first stage keeps its gradient receive
        # buffer; later stages also an activation receive buffer and, per pipe buffer, the stage
        # output (the last stage never clears it). During the pass the outputs of the in-flight
        # micro-batches wait for their backward (no op of this stage saves them).
        unit = tokens * h * prec.residual
        buffers = max(2, min(c.pp - stage, c.grad_accum))  # TrainSchedule.num_pipe_buffers
        kept = unit if stage == 0 else (2 + buffers) * unit
        waiting = kept + (in_flight * unit if stage < c.pp - 1 else 0.0)
        lines.append(Line("pipeline buffers", kept, waiting, waiting, kept, "received activations and gradients, "
                          "stage outputs"))
    on, off = (sum(activations(r)) for r in (True, False))
    return lines, on, off, in_flight


def _loss_bytes(recipe: "Recipe", c: Candidate, tokens: int) -> tuple[float, float, float]:
    """(final norm's saved tensors, loss gradients held until backward, chunk temporaries) on the last stage."""
    m = recipe.model
    w = precision_of(m.precision).weight  # the features are cast to the head's dtype
    h = m.hidden_size
    v_local = m.padded_vocab(c.tp) // c.tp
    n_local = min(v_local, m.num_tokens)  # real tokens this shard projects (upper bound)
    projected = tokens  # worst case: every token masked (t near 1)
    chunk = min(LOSS_CHUNK, projected)
    norm = tokens * h * 12  # final LayerNorm: fp32 input, normalised, scaled
    held = tokens * h * w + v_local * h * w + v_local * w  # d hidden, d weight, d bias
    # During the last chunk: the fp32 weight-gradient accumulator and a matmul's fp32 product of
    # that size (the accumulator is the held gradient when the head is fp32), the chunk's logits and
    # their copy for the gradient (fp32), its bf16 cast for bf16 heads, and the projected tokens'
    # hidden rows and their fp32 gradients.
    chunks = (v_local * h * 4 * (2 if w == 2 else 1) + 2 * chunk * n_local * 4 + (chunk * n_local * 2 if w == 2 else 0)
              + projected * h * (4 + w))
    return norm, held, chunks


def stage_memory(recipe: "Recipe", c: Candidate, stage: int, a: Assumptions = Assumptions()) -> StageMemory:
    """Memory of one GPU of pipeline stage `stage` for candidate `c`."""
    m = recipe.model
    sp = stage_params(m, c.tp, c.pp, stage)
    act, on, off, in_flight = _activation_lines(recipe, c, stage, a)
    return StageMemory(stage, sp, tuple(_states(m, c, stage, sp, a) + act), on, off, in_flight)


def stages(pp: int) -> list[int]:
    """The distinct kinds of stage: first, a middle one (all middle stages are alike), last."""
    return sorted({0, min(1, pp - 1), pp - 1})


def device_bytes(peak: float, a: Assumptions) -> float:
    """What a tensor peak needs of a GPU: the peak, allocator slack, CUDA context and NCCL."""
    return peak * (1.0 + a.fragmentation) + a.reserve_bytes


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
        out.append(f"memory: stage {worst.stage} needs {p.needed_bytes / GB:.1f} GB per GPU (tensor peak "
                   f"{worst.peak / GB:.1f} GB in the {worst.peak_phase} phase, plus reserve) > the "
                   f"{p.gpu.memory_bytes / GB:.0f} GB of an {p.gpu.name}: --propose lists layouts that fit (more "
                   "TP/PP or ZeRO, activation checkpointing, a smaller micro batch)")
    elif c.recompute:
        off = plan_without_recompute(recipe, p)
        if off.fits:
            out.append(f"activation checkpointing is on although the layout fits without it "
                       f"({off.needed_bytes / GB:.1f} of {p.gpu.memory_bytes / GB:.0f} GB): "
                       f"model.activation_checkpointing: false takes the step from {p.time.total:.3g} s to "
                       f"{off.time.total:.3g} s")
    bucket = worst.item("buffers")
    if c.zero_stage > 0 and "bucket" in bucket.note and bucket.backward > 0.05 * worst.peak:
        out.append(f"DeepSpeed's ZeRO reduce bucket takes {bucket.backward / GB:.2f} GB per GPU "
                   f"({p.assumptions.reduce_bucket_size:.3g} elements, zero_optimization.reduce_bucket_size's "
                   "default, allocated whole)")
    return out


def plan_without_recompute(recipe: "Recipe", p: Plan) -> Plan:
    """The same plan with activation checkpointing off."""
    return plan(recipe, dataclasses.replace(p.candidate, recompute=False), p.gpu, p.assumptions, p.peak_tflops)


def _accum_for(pp: int) -> int:
    """The smallest gradient accumulation with a bubble of at most BUBBLE_WARN."""
    return math.ceil((pp - 1) * (1 - BUBBLE_WARN) / BUBBLE_WARN)


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def accumulates_in_bf16(m: ModelConfig, c: Candidate) -> bool:
    """Whether gradients of several micro-batches are summed in bf16: bf16 weights outside ZeRO-1 (only
    BF16_Optimizer under ZeRO-1 gets engine.deepspeed_config's fp32 accumulator), with grad_accum > 1."""
    return m.precision == "bf16" and c.zero_stage != 1 and c.grad_accum > 1


def candidates(recipe: "Recipe", world_size: int, a: Assumptions = Assumptions()) -> list[Candidate]:
    """Every layout the trainer accepts for `world_size`: tp | heads and tp <= GPUs per node, pp | blocks,
    ZeRO 0-3 (0-1 with a pipeline; not 0 with bf16 weights), micro batches dividing the per-rank batch,
    recompute on and off."""
    m, g = recipe.model, recipe.parallel.global_batch
    out = []
    for tp in (t for t in _divisors(m.n_heads) if t <= a.gpus_per_node):
        for pp in _divisors(m.n_blocks):
            if world_size % (tp * pp):
                continue
            dp = world_size // (tp * pp)
            if g % dp:
                continue
            for micro in _divisors(g // dp):
                for zero in ((0, 1) if pp > 1 else (0, 1, 2, 3))[1 if m.precision == "bf16" else 0:]:
                    for recompute in (False, True):
                        out.append(Candidate(tp, pp, dp, zero, micro, g // (dp * micro), recompute))
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
# Text.
def _gb(x: float) -> str:
    return f"{x / GB:.2f}"


def format_plan(recipe: "Recipe", p: Plan) -> str:
    """The plan as a table (one column per distinct pipeline stage), its time estimate, assumptions and warnings."""
    c, a = p.candidate, p.assumptions
    if c.pp == 1:
        heads = ["per GPU"]
    else:
        heads = [("stage 0" if s.stage == 0 else f"stage {c.pp - 1}" if s.stage == c.pp - 1 else f"stages 1-{c.pp - 2}")
                 for s in p.memory]
    rows: list[tuple[str, list[str], str]] = [
        ("parameters held", [f"{s.params.total / 1e6:,.1f}M" for s in p.memory], "this GPU's TP/PP shard")]
    labels = []
    for s in p.memory:
        labels += [line.label for line in s.lines if line.label not in labels]
    for label in labels:
        lines = [next((ln for ln in s.lines if ln.label == label), None) for s in p.memory]
        note = next(ln.note for ln in lines if ln is not None)
        rows.append((f"{label} (GB)", ["-" if ln is None else _gb(ln.most) for ln in lines], note))
    rows.append(("activations, recompute on/off (GB)",
                 [f"{_gb(s.activations_recompute)}/{_gb(s.activations_no_recompute)}" for s in p.memory],
                 "saved + the backward's extra, at this micro batch"))
    for name in PHASES:
        rows.append((f"total at {name} (GB)", [_gb(s.phase(name)) for s in p.memory], ""))
    rows.append(("needed per GPU (GB)", [_gb(device_bytes(s.peak, a)) for s in p.memory],
                 f"peak x {1 + a.fragmentation:g} + {a.reserve_bytes / GB:g} GB CUDA/NCCL, of "
                 f"{p.gpu.memory_bytes / GB:.0f} GB"))
    width = max(len(r[0]) for r in rows)
    col = max(10, *(len(h) for h in heads), *(len(x) for r in rows for x in r[1]))
    out = [f"plan: {p.gpu.name} ({p.gpu.memory_bytes / GB:.0f} GB), {c.describe()}",
           "  " + " " * width + "".join(f"  {h:>{col}}" for h in heads)]
    for label, cells, note in rows:
        out.append("  " + f"{label:<{width}}" + "".join(f"  {x:>{col}}" for x in cells) + (f"  {note}" if note else ""))
    t, f = p.time, p.flops
    out.append(f"  pipeline bubble: {p.bubble:.1%} (1F1B: (pp - 1) / (grad_accum + pp - 1) = "
               f"{c.pp - 1}/{c.grad_accum + c.pp - 1})")
    out.append(f"  step: ~{t.total:.3g} s = compute {t.compute:.3g} + TP all-reduce {t.tp_comm:.3g} + bubble "
               f"{t.bubble:.3g} + DP exchange {t.dp_comm:.3g}; {p.tokens_per_s:,.0f} tokens/s; MFU {p.mfu:.1%} "
               f"of {p.peak_tflops:g} TFLOP/s")
    out.append(f"  FLOPs per token: model {f.model / 1e9:.4g} G, executed {f.executed / 1e9:.4g} G (matmuls only; "
               f"the loss projects {projected_fraction(recipe):.3f} of the tokens)")
    out.append(f"  assumes: matmuls at {a.efficiency:.0%} of peak"
               + (f" ({p.gpu.tf32_tflops:g} TFLOP/s TF32 for fp32)" if recipe.model.precision == "fp32" else "")
               + f" + {a.block_overhead_s * 1e3:g} ms per block per micro-batch; NCCL {a.intra_node_gbps:g} GB/s in a "
               f"node, {a.inter_node_gbps:g} GB/s across nodes ({a.gpus_per_node} GPUs each); communication not "
               "overlapped with compute")
    out += [f"warning: {w}" for w in p.warnings]
    return "\n".join(out)


def format_proposals(recipe: "Recipe", world_size: int, plans: list[Plan], limit: int = 10) -> str:
    """The fastest fitting layouts (`propose`'s result for `world_size`) as a table."""
    if not plans:
        if not candidates(recipe, world_size):
            return (f"no layout exists for {world_size} GPUs: it must be tp x pp x dp with tp dividing "
                    f"model.n_heads={recipe.model.n_heads} (at most the GPUs of a node), pp dividing "
                    f"model.n_blocks={recipe.model.n_blocks} and dp dividing parallel.global_batch="
                    f"{recipe.parallel.global_batch}")
        return f"no layout fits {world_size} GPUs: more GPUs, a smaller model or a GPU with more memory is needed"
    out = [f"{len(plans)} layouts fit; the fastest {min(limit, len(plans))}:"]
    if recipe.model.precision == "bf16":
        out.append("(left out: ZeRO-0/2/3 with gradient accumulation, which sum the micro-batches' gradients in bf16)")
    out.append(f"{'tp':>3} {'pp':>3} {'dp':>5} {'zero':>4} {'micro':>5} {'accum':>5} {'recomp':>6} {'GB/GPU':>7} "
               f"{'bubble':>7} {'step s':>7} {'tokens/s':>11} {'MFU':>6}")
    for p in plans[:limit]:
        c = p.candidate
        out.append(f"{c.tp:>3} {c.pp:>3} {c.dp:>5} {c.zero_stage:>4} {c.micro_batch:>5} {c.grad_accum:>5} "
                   f"{'on' if c.recompute else 'off':>6} {p.needed_bytes / GB:>7.1f} {p.bubble:>7.1%} "
                   f"{p.time.total:>7.3g} {p.tokens_per_s:>11,.0f} {p.mfu:>6.1%}")
    return "\n".join(out)


__all__ = ["Assumptions", "Candidate", "GPUS", "Gpu", "Plan", "StageMemory", "accumulates_in_bf16",
           "block_saved_bytes_per_token", "bubble_fraction", "candidate_of", "candidates", "flops_per_token",
           "format_plan", "format_proposals", "plan", "propose", "stage_memory", "stage_params",
           "step_time"]
