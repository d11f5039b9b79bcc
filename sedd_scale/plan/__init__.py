"""Layout planner: per-GPU memory, pipeline bubble, step time and MFU of a recipe's layout, and a search.

Pure arithmetic over the recipe's sizes: no process group, no DeepSpeed or megatron-core import, so
the pre-flight check `python -m sedd_scale.config RECIPE --world-size N` prints it instantly for any
world size (a proposal search over the ~10^3 layouts of a 7B model at 1,024 GPUs takes under a second).

Memory per GPU is what this repository's training step allocates under the ZeRO settings
`engine.deepspeed_config` passes (the recipe's `parallel.zero_*` keys, DeepSpeed's defaults otherwise), worked
out from the code and checked against the measured tensor peaks of real small runs (tests/test_planner.py,
benchmarks/bench_planner.py):

* Model states (`_states`) follow the optimizer DeepSpeed picks for the precision and ZeRO stage:
  plain torch AdamW (fp32 weights, ZeRO-0), DeepSpeedZeroOptimizer (ZeRO-1/2: a flat fp32 master
  partition is always cloned, even for fp32 weights; ZeRO-3: partitioned weights, gradients and a
  persistent reduce bucket, small tensors whole, the stage's parameters gathered in forward and
  backward), BF16_Optimizer (bf16 weights under ZeRO-1 or a pipeline: fp32 master and Adam
  partitions, a whole gradient accumulator, fp32 under ZeRO-1, plus the bf16 gradients) and the bf16
  FP16_UnfusedOptimizer (bf16 weights, ZeRO-0: whole fp32 masters and moments).
* ZeRO-1/2/3 allocate their reduce bucket at `parallel.zero_reduce_bucket_size` elements whatever the model
  size (2e8 by default: 0.8 GB in fp32, 0.4 GB in bf16); ZeRO-1/2 a second one with `zero_overlap_comm`
  (`memory.reduce_buckets`).
* The EMA is fp32 and sharded over data parallelism: 4 B x params / DP (`sedd_scale/train/ema.py`).
* Activations are the tensors a block saves for backward (`block_saved_bytes_per_token`: the
  adaLN-modulated LayerNorms, qkv, rotary, SDPA, the GELU-tanh MLP), for every micro-batch in flight
  on the stage under DeepSpeed's 1F1B schedule (stage s of p holds min(p - s, grad_accum)); with
  activation checkpointing a block keeps only its input and one block is recomputed at a time.
* The fused loss (`sedd_scale/loss/vocab_parallel.py`) forms its gradients in the forward pass and
  holds them until backward: d hidden (tokens x H), d weight and d bias of the head shard; its chunk
  temporaries count projected tokens only (masked ones for absorb; the worst case, all masked, is
  used since every step draws new t).

* Sequence parallelism (`parallel.sequence_parallel`) divides the replicated part of each block's saved
  tensors, the pipeline sends and the final norm by TP, and adds megatron's kept all-gather buffer and the
  loss's gathered features; context parallelism (`parallel.context_parallel`, Ulysses) divides every per-token
  activation by CP (a rank holds L / CP positions), adds the all-to-alls' copies, and spreads ZeRO's partitions
  and the EMA over DP x CP (`block_saved_bytes_per_token`, `memory._activation_lines`; a real block's saved
  bytes at TP2 with and without SP and at CP2 are measured in tests/test_planner.py).

Each item is given at six moments (`Line`): between steps, at the end of a forward pass, at the
backward peak, after the last backward (the DP gradient reduction and the optimizer step), and during
validation and sampling, which run between steps with the EMA weights loaded (`EMA.applied` gathers
the whole fp32 average and clones the training weights: 6 B per parameter for bf16 weights under DP,
on top of the training states; `memory._eval_lines`); the peak is the largest of the last five sums.
Not counted in the tensor peak: the CUDA context, NCCL's buffers and allocator fragmentation, which
`Assumptions` adds as a reserve, and small per-sequence tensors (adaLN outputs, batch x 6H per block;
rotary tables, L x head dim).

FLOPs are the matmuls actually done (`flops_per_token`): the input embedding is a lookup (none);
the head projects only the tokens the loss needs (the expected masked fraction for absorb) and only
the real vocabulary (the fused loss skips MASK and padding); attention is bidirectional over the
whole sequence; flash attention's backward recomputes the scores; activation checkpointing runs
each block's forward twice. Model FLOPs (for MFU) leave out both recomputations.

Time (`speed.step_time`): per micro-batch the slowest stage's matmuls (a CP rank's share: 1 / CP of the
tokens, attention over all L keys for its heads / CP), its TP all-reduces (under SP the same volume as
all-gathers and reduce-scatters, plus the loss's gather), CP's all-to-alls and its pipeline sends
(activations forward, their gradients back), times grad_accum + pp - 1 slots, plus the
DP exchange that the backward (and, for ZeRO-3's gathers, the forward) does not hide
(`speed.dp_exchange`: with overlap_comm at least the last bucket of each overlapped reduction is exposed).
Collectives follow the nodes (`speed.group_bandwidth`): NVLink inside a node; across nodes a ring is
limited by the node's network bandwidth shared by the groups with members on the node.
"""
from sedd_scale.plan.hardware import (
                                      ALLREDUCE_BUCKET_SIZE,
                                      COMPILE_MINUTES_PER_STAGE,
                                      DEFAULT_GPU,
                                      GB,
                                      GPUS,
                                      LOSS_CHUNK_BYTES,
                                      MAX_LIVE_PARAMETERS,
                                      PARAM_PERSISTENCE_THRESHOLD,
                                      Assumptions,
                                      Gpu,
)
from sedd_scale.plan.memory import (
                                      EVAL_PHASES,
                                      PHASES,
                                      SAMPLE_BATCH,
                                      TRAINING_PHASES,
                                      Candidate,
                                      Line,
                                      StageMemory,
                                      StageParams,
                                      _tensors,
                                      block_saved_bytes_per_token,
                                      candidate_of,
                                      device_bytes,
                                      overlaps_reduction,
                                      precision_of,
                                      reduce_buckets,
                                      sp_gather_buffer_per_token,
                                      stage_memory,
                                      stage_params,
                                      stages,
                                      uses_bf16_optimizer,
)
from sedd_scale.plan.report import format_batch_proposal, format_plan, format_proposals
from sedd_scale.plan.search import (
                                      BATCH_MULTIPLES,
                                      BUBBLE_WARN,
                                      COMPILE_WARN,
                                      NEAR_BEST,
                                      STARVED,
                                      BatchProposal,
                                      Plan,
                                      _accum_for,
                                      accumulates_in_bf16,
                                      candidates,
                                      plan,
                                      plan_without_recompute,
                                      propose,
                                      propose_global_batch,
                                      with_global_batch,
)
from sedd_scale.plan.speed import (
                                      DpExchange,
                                      Flops,
                                      StepTime,
                                      bubble_fraction,
                                      dp_exchange,
                                      exposed_seconds,
                                      flops_per_token,
                                      group_bandwidth,
                                      p2p_bandwidth,
                                      p2p_seconds_per_micro_batch,
                                      step_time,
)

__all__ = [
    "ALLREDUCE_BUCKET_SIZE", "BATCH_MULTIPLES", "BUBBLE_WARN", "COMPILE_MINUTES_PER_STAGE", "COMPILE_WARN",
    "DEFAULT_GPU", "EVAL_PHASES", "GB", "GPUS", "LOSS_CHUNK_BYTES", "MAX_LIVE_PARAMETERS", "NEAR_BEST",
    "PARAM_PERSISTENCE_THRESHOLD", "PHASES", "SAMPLE_BATCH", "STARVED", "TRAINING_PHASES", "Assumptions",
    "BatchProposal", "Candidate", "DpExchange", "Flops", "Gpu", "Line", "Plan", "StageMemory", "StageParams",
    "StepTime", "_accum_for", "_tensors", "accumulates_in_bf16", "block_saved_bytes_per_token", "bubble_fraction",
    "candidate_of", "candidates", "device_bytes", "dp_exchange", "exposed_seconds", "flops_per_token",
    "format_batch_proposal", "format_plan", "format_proposals", "group_bandwidth", "overlaps_reduction",
    "p2p_bandwidth", "p2p_seconds_per_micro_batch", "plan", "plan_without_recompute", "precision_of", "propose",
    "propose_global_batch", "reduce_buckets", "sp_gather_buffer_per_token", "stage_memory", "stage_params", "stages",
    "step_time", "uses_bf16_optimizer", "with_global_batch",
]
