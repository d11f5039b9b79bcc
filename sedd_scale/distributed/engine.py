"""Process groups and the DeepSpeed engine for a TP x CP x PP x DP layout.

megatron-core's tensor-parallel layers talk over megatron's `parallel_state` groups; DeepSpeed's
ZeRO and pipeline engines use their own. Both are built from the same layout and checked to
coincide: rank = tp_rank + TP * (cp_rank + CP * (dp_rank + DP * pp_rank)) in megatron's default order
"tp-cp-ep-dp-pp" and in DeepSpeed's `PipeModelDataParallelTopology` (axes pipe, data, model) with a
data axis of DP x CP ranks: context-parallel ranks hold the same weights and each a share of the
gradients, so DeepSpeed partitions (ZeRO) and averages over megatron's DP x CP group (the model
scales its loss by CP, as Megatron does, so that average is the sum over positions).

* PP = 1: the model is an ordinary module, `deepspeed.initialize(mpu=MegatronMPU())`, so ZeRO
  shards over megatron's DP x CP group and the clipping norm sums over TP shards.
  Without an mpu DeepSpeed treats every rank as data-parallel and is silently wrong.
* PP > 1: the model is a DeepSpeed `PipelineModule` built on `init_layout`'s topology; its
  engine takes no mpu (it derives one from the topology) and supports ZeRO-1 only.
"""
from __future__ import annotations

import datetime
import os
from typing import Any

import sedd_scale.compat  # noqa: F401  (CPU workarounds before megatron / deepspeed)

import deepspeed
import deepspeed.utils.groups
import torch
import torch.distributed as dist
from deepspeed.pipe import PipelineModule
from deepspeed.runtime import utils as ds_utils
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from megatron.core import parallel_state as ps

from sedd_scale import accelerators
from sedd_scale.config import Layout, OptimConfig, Recipe
from sedd_scale.distributed import parallel
from sedd_scale.distributed.optim import SkipGuard, guarded


def env_world_size() -> int:
    """The world size the launcher set (WORLD_SIZE), 1 for a plain `python` run."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_world(timeout_s: float = 600.0) -> tuple[int, int]:
    """Join (or create, for a plain single process) the default process group and attach DeepSpeed's
    communication layer to it; returns (rank, world size)."""
    if "RANK" not in os.environ:  # `python -m sedd_scale.train` without a launcher: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")  # no master: a world of one
    if torch.cuda.is_available():  # before NCCL creates its communicators on the wrong device
        torch.cuda.set_device(parallel.local_device())
        enable_tf32()
    # A timeout turns a hang (mismatched collectives, a dead rank) into an error.
    parallel.join_process_group(parallel.default_backend(), timeout_s=timeout_s)
    # DeepSpeed's comm layer (used by PipelineModule before any engine exists) wraps the same group.
    deepspeed.init_distributed(dist_backend=parallel.default_backend(), auto_mpi_discovery=False, verbose=False,
                               timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def enable_tf32() -> None:
    """fp32 GEMMs and convolutions on CUDA tensor cores (TF32: fp32 range, 10-bit operand mantissa, fp32
    accumulation), the usual setting for training; norms, reductions and elementwise work stay fp32.

    The flags of torch 2.4 (still honoured, and mapped onto the newer fp32_precision settings); not
    `torch.set_float32_matmul_precision`, which also changes CPU (oneDNN) matmuls.
    """
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def init_layout(layout: Layout, timeout_s: float | None = None) -> PipeModelDataParallelTopology:
    """Initialise megatron's TP/CP/PP/DP groups for `layout` (collective timeout `timeout_s`, None: megatron-core's
    default), check them against DeepSpeed's topology (its data axis is DP x CP), return it."""
    if not dist.is_initialized():
        raise RuntimeError("init_layout needs the default process group: call init_world() first")
    if dist.get_world_size() != layout.world_size:
        raise RuntimeError(f"layout is for {layout.world_size} ranks but {dist.get_world_size()} were launched")
    parallel.init_model_parallel(layout.tp, layout.pp, cp=layout.cp, timeout_s=timeout_s)
    topology = PipeModelDataParallelTopology(num_pp=layout.pp, num_mp=layout.tp, num_dp=layout.data_group_size)
    check_topology(topology)
    return topology


def check_topology(topology: PipeModelDataParallelTopology) -> None:
    """Raise unless this rank's megatron TP / DP x CP / PP groups are DeepSpeed's model/data/pipe axis groups."""
    rank = dist.get_rank()
    pairs = {"model": ("tensor-parallel", ps.get_tensor_model_parallel_group()),
             "data": ("data x context-parallel", ps.get_data_parallel_group(with_context_parallel=True)),
             "pipe": ("pipeline-parallel", ps.get_pipeline_model_parallel_group())}
    for axis, (name, group) in pairs.items():
        megatron_ranks = sorted(dist.get_process_group_ranks(group))
        deepspeed_ranks = next(sorted(g) for g in topology.get_axis_comm_lists(axis) if rank in g)
        if megatron_ranks != deepspeed_ranks:
            raise RuntimeError(f"rank {rank}: megatron's {name} group {megatron_ranks} differs from DeepSpeed's "
                               f"'{axis}' axis {deepspeed_ranks}; megatron must use its default rank order "
                               "tp-cp-ep-dp-pp to match PipeModelDataParallelTopology")


def _data_group():
    return ps.get_data_parallel_group(with_context_parallel=True)


def _data_rank() -> int:
    return ps.get_data_parallel_rank(with_context_parallel=True)


def _data_size() -> int:
    return ps.get_data_parallel_world_size(with_context_parallel=True)


class MegatronMPU:
    """DeepSpeed's `mpu` protocol over megatron's parallel_state: model-parallel means tensor-parallel, and
    data-parallel means DP x CP (what ZeRO partitions over and DeepSpeed averages gradients over: context-parallel
    ranks hold the same weights)."""

    get_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_tensor_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_tensor_model_parallel_src_rank = staticmethod(ps.get_tensor_model_parallel_src_rank)
    get_pipeline_model_parallel_rank = staticmethod(ps.get_pipeline_model_parallel_rank)
    get_pipeline_model_parallel_world_size = staticmethod(ps.get_pipeline_model_parallel_world_size)
    get_pipeline_model_parallel_group = staticmethod(ps.get_pipeline_model_parallel_group)
    get_data_parallel_rank = staticmethod(_data_rank)
    get_data_parallel_world_size = staticmethod(_data_size)
    get_data_parallel_group = staticmethod(_data_group)

    @staticmethod
    def get_data_parallel_group_ranks() -> list[int]:
        """Global ranks of this rank's data-parallel (DP x CP) group."""
        return dist.get_process_group_ranks(_data_group())


def deepspeed_config(recipe: Recipe, layout: Layout) -> dict[str, Any]:
    """The DeepSpeed config dict for a recipe under a resolved layout (no DeepSpeed-built optimizer)."""
    config: dict[str, Any] = {
        # DeepSpeed counts micro-batches over its data group, DP x CP (CP ranks each run a chunk of the same rows)
        "train_batch_size": layout.global_batch * layout.cp,
        "train_micro_batch_size_per_gpu": layout.micro_batch,
        "gradient_accumulation_steps": layout.grad_accum,
        "gradient_clipping": recipe.optim.grad_clip,
        "zero_optimization": zero_optimization(recipe, layout),
        # model.precision "bf16": bf16 parameters, DeepSpeed keeps fp32 master weights. "bf16-mixed"
        # keeps fp32 parameters (autocast inside the model), so DeepSpeed runs fp32.
        "bf16": {"enabled": recipe.model.precision == "bf16"},
        # Our AdamW (torch's or apex's under optim.SkipGuard) is not on DeepSpeed's exact-type ZeRO whitelist.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # the trainer logs; DeepSpeed's own prints stay off
        "wall_clock_breakdown": False,
        # Stages exchange (hidden, conditioning); DeepSpeed's activation partitioning over TP ranks
        # handles a single tensor (or later ones without gradients) only, so it stays off.
        "pipeline": {"pipe_partitioned": False, "grad_partitioned": False},
    }
    if recipe.model.precision == "bf16" and layout.pp > 1:
        # With the SEDD stages under the pipeline engine (DeepSpeed 0.19.8), BF16_Optimizer's default accumulation
        # into its fp32 gradients (at the end of each backward) left them zero: gradient norm 0, no weight moved
        # (measured through the trainer, PP2 ZeRO-1, 4 micro-batches, gloo; tests/test_engine.py's toy pipeline is
        # not affected; the cause inside DeepSpeed is not pinned down). Accumulating in the parameters' gradient
        # hooks gives the fp32 pipeline's norms (6.451 vs 6.454 after the first step); benchmarks/gpu_check.py's
        # train-bf16-pp2 row checks that the norms are positive.
        config["bf16"]["immediate_grad_update"] = True
    if recipe.model.precision == "bf16" and layout.zero_stage == 1:
        # bf16 weights with fp32 master weights and fp32 gradient accumulation (DeepSpeed's
        # BF16_Optimizer), the Megatron-DeepSpeed setting; ZeRO-2/3 keep fp32 partitions themselves.
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


def zero_optimization(recipe: Recipe, layout: Layout) -> dict[str, Any]:
    """DeepSpeed's `zero_optimization` section: the stage and, for ZeRO-1/2/3, the recipe's overlap and buckets.

    ZeRO-0 takes only the stage (DeepSpeed builds no ZeRO optimizer: its fallback all-reduce and BF16_Optimizer
    read none of these keys). With pp > 1 overlap_comm is false: DeepSpeed's pipeline engine turns it off (with
    a warning) because it runs the backward and the reduction itself. allgather_bucket_size is left out: with
    torch's all_gather_into_tensor, DeepSpeed 0.19.8 gathers each flat partition in one call and never reads it.
    """
    p = recipe.parallel
    if layout.zero_stage == 0:
        return {"stage": 0}
    zero: dict[str, Any] = {"stage": layout.zero_stage, "overlap_comm": p.zero_overlap_comm and layout.pp == 1,
                            "contiguous_gradients": p.zero_contiguous_gradients,
                            "reduce_bucket_size": p.zero_reduce_bucket_size}
    if layout.zero_stage == 3:
        zero["stage3_prefetch_bucket_size"] = p.zero_prefetch_bucket_size
    return zero


def build_optimizer(model: torch.nn.Module, optim: OptimConfig, total_steps: int, zero_stage: int = 0
                    ) -> tuple[SkipGuard, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW that skips non-finite steps and its warmup + constant/cosine schedule.

    apex's FusedAdam where `accelerators` picks it (CUDA with apex), else torch's fused kernel (one pass
    per tensor, on CPU as on CUDA; nothing for DeepSpeed to compile). Not apex under ZeRO-3: DeepSpeed steps
    each ZeRO-3 sub-group with its own `step()` call, and apex counts its bias-correction step per group per
    call, so a step of several sub-groups would advance it several times; torch counts per parameter.

    Weight decay, when non-zero, applies to matrices only (not to biases and norm weights).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    # "decay" marks the group weight decay applies to (a resume re-applies the recipe's value to it).
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": optim.weight_decay, "decay": True},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "decay": False}]
    groups = [g for g in groups if g["params"]]
    device = next(iter(params)).device
    adam = accelerators.adam_class(accelerators.choose(cuda=device.type == "cuda"))
    if zero_stage == 3:
        adam = torch.optim.AdamW
    kwargs = {"fused": True} if adam is torch.optim.AdamW else {"adam_w_mode": True}
    optimizer = guarded(adam)(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps, **kwargs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: optim.lr_at(step, total_steps) / optim.lr)
    return optimizer, scheduler


def build_engine(model: torch.nn.Module, recipe: Recipe, layout: Layout, total_steps: int | None = None):
    """Wrap `model` (a PipelineModule when layout.pp > 1) in a DeepSpeed engine with its optimizer and schedule."""
    is_pipe = isinstance(model, PipelineModule)
    if layout.pp > 1 and not is_pipe:
        raise ValueError(f"pp={layout.pp} needs the model as a deepspeed.pipe.PipelineModule built on "
                         "init_layout()'s topology")
    if is_pipe and model.topology().get_dim("pipe") != layout.pp:
        raise ValueError(f"the PipelineModule has {model.topology().get_dim('pipe')} stages, the layout pp={layout.pp}")
    # DeepSpeed keeps the last engine's mpu in a module global; a stale one breaks the next engine.
    deepspeed.utils.groups.mpu = None
    optimizer, scheduler = build_optimizer(model, recipe.optim, total_steps or recipe.train.steps, layout.zero_stage)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(recipe, layout),
                                           mpu=None if is_pipe else MegatronMPU())
    # Every group exists now (the PipelineModule's grid, the engine's p2p groups), DeepSpeed's with torch's default
    # timeout for new groups: all take the recipe's.
    parallel.set_group_timeouts(timeout_s(recipe))
    if engine.optimizer is optimizer:  # no ZeRO/bf16 wrapper: DeepSpeed calls ours directly
        _guard_by_grad_norm(engine, optimizer)
        if layout.data_group_size == 1:
            # DeepSpeed would flatten every gradient into a bucket, all-reduce it over a group of one and
            # copy it back (three passes over all gradients, for nothing).
            engine.enable_backward_allreduce = False
            if is_pipe:
                engine.pipeline_enable_backward_allreduce = False
    return engine


def _guard_by_grad_norm(engine, optimizer: SkipGuard) -> None:
    """Without a wrapper DeepSpeed clips fp32 gradients but drops the norm: keep it (get_global_grad_norm())
    and let the optimizer skip a step on a non-finite one, as DeepSpeed's ZeRO/bf16 wrappers do."""
    clip = engine.gradient_clipping()
    fresh: list[float | None] = [None]

    def clip_fp32_gradients():
        # DeepSpeed's TP-aware clipping (mpu); called right before optimizer.step() when clipping is on.
        norm = ds_utils.clip_grad_norm_(parameters=engine.module.parameters(), max_norm=clip, mpu=engine.mpu)
        fresh[0] = engine._global_grad_norm = float(norm)

    def grad_norm() -> float:
        norm, fresh[0] = fresh[0], None
        if norm is None:  # clipping off: the same norm, scaled by min(1, inf / norm) = 1
            norm = float(ds_utils.clip_grad_norm_(parameters=engine.module.parameters(), max_norm=float("inf"),
                                                  mpu=engine.mpu))
            engine._global_grad_norm = norm
        return norm

    engine.clip_fp32_gradients = clip_fp32_gradients
    optimizer.grad_norm = grad_norm


def timeout_s(recipe: Recipe) -> float:
    """The recipe's collective timeout in seconds (`parallel.distributed_timeout_minutes`)."""
    return 60.0 * recipe.parallel.distributed_timeout_minutes


def setup(recipe: Recipe) -> tuple[Layout, PipeModelDataParallelTopology]:
    """Resolve the layout for the launched world size (refusing impossible ones first), then build all groups
    with the recipe's collective timeout."""
    layout = recipe.layout(env_world_size())  # raises before any process group exists
    init_world(timeout_s(recipe))
    return layout, init_layout(layout, timeout_s(recipe))


def describe_rank() -> str:
    """This rank's place in the layout, for logs."""
    return (f"rank {dist.get_rank()}/{dist.get_world_size()} local {os.environ.get('LOCAL_RANK', '0')} "
            f"master {os.environ.get('MASTER_ADDR', 'none')}:{os.environ.get('MASTER_PORT', 'none')} | "
            f"tp {ps.get_tensor_model_parallel_rank()} cp {ps.get_context_parallel_rank()} "
            f"pp {ps.get_pipeline_model_parallel_rank()} dp {ps.get_data_parallel_rank()} | "
            f"backend {dist.get_backend()}")
