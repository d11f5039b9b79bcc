"""Process groups for a TP x CP x PP x DP layout (megatron-core `parallel_state`) and small TP helpers."""
from __future__ import annotations

import datetime
import os
import socket

import sedd_scale.compat  # noqa: F401  (before megatron.core)

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from torch import Tensor


def local_device() -> torch.device:
    """This process's device: GPU LOCAL_RANK modulo the visible GPUs (a cluster that binds one GPU per task shows
    each task one device, LOCAL_RANK notwithstanding), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())


def default_backend() -> str:
    """nccl when CUDA is present, else gloo."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def join_process_group(backend: str | None = None, timeout_s: float = 600.0) -> None:
    """Join the default process group: from torchrun's environment, or as a lone process when it is unset."""
    if dist.is_initialized():
        return
    timeout = datetime.timedelta(seconds=timeout_s)
    backend = backend or default_backend()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group(backend, timeout=timeout)
        return
    # A world of one meets no one: an in-memory store. (A port picked in advance for a TCP store can be handed to
    # another process before the store binds it, and two lone runs on one machine then fail with EADDRINUSE.)
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)


def free_port() -> int:
    """A TCP port that is free on the loopback interface right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_model_parallel(tp: int = 1, pp: int = 1, *, cp: int = 1, seed: int | None = None,
                        timeout_s: float | None = None) -> None:
    """Create megatron's TP/CP/PP/DP groups (DP = world / (tp * cp * pp)) with collectives timing out after
    `timeout_s` (None: megatron-core's default, 30 min); seed the RNGs when `seed` is given."""
    join_process_group()
    world = dist.get_world_size()
    if tp < 1 or pp < 1 or cp < 1 or world % (tp * cp * pp):
        raise ValueError(f"world size {world} is not divisible by tp*cp*pp = {tp}*{cp}*{pp}: "
                         f"launch a multiple of {tp * cp * pp} processes or change tp/cp/pp")
    if ps.model_parallel_is_initialized():
        have = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
                ps.get_context_parallel_world_size())
        if have != (tp, pp, cp):
            raise RuntimeError(f"parallel groups already exist for tp={have[0]}, pp={have[1]}, cp={have[2]}; "
                               "call sedd_scale.distributed.parallel.destroy_parallel() before asking for "
                               f"tp={tp}, pp={pp}, cp={cp}")
    else:
        timeout = {} if timeout_s is None else {"distributed_timeout_minutes": timeout_s / 60}
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                     context_parallel_size=cp, **timeout)
    if seed is not None:
        seed_parallel(seed)


def _groups() -> list[dist.ProcessGroup]:
    """Every process group this rank belongs to, whoever created it (torch keeps no public list)."""
    registry = getattr(dist.distributed_c10d, "_world", None)
    if registry is None or not hasattr(dist.distributed_c10d, "_set_pg_timeout"):
        raise RuntimeError(f"torch {torch.__version__} lists no process groups or cannot set their timeouts "
                           "(torch.distributed.distributed_c10d._world / _set_pg_timeout): use torch 2.4 or later")
    rank = dist.get_rank()
    return [g for g in registry.pg_map if rank in dist.get_process_group_ranks(g)]


def set_group_timeouts(timeout_s: float) -> None:
    """Give every process group of this rank the collective timeout `timeout_s`: DeepSpeed creates its groups
    (pipeline grid, p2p) with torch's default for new groups (10 min under NCCL, 30 under gloo), not the
    default group's."""
    timeout = datetime.timedelta(seconds=timeout_s)
    for group in _groups():
        dist.distributed_c10d._set_pg_timeout(timeout, group)


def group_timeout(group: dist.ProcessGroup) -> float:
    """A process group's collective timeout in seconds (the largest over its backends: gloo, NCCL)."""
    return max(group._get_backend(device).options._timeout.total_seconds() for device in group._device_types)


def group_timeouts() -> list[float]:
    """The collective timeout in seconds of every process group of this rank (for checks and logs)."""
    return [group_timeout(g) for g in _groups()]


def destroy_parallel() -> None:
    """Forget megatron's groups (the default process group stays)."""
    ps.destroy_model_parallel()


def seed_parallel(seed: int) -> None:
    """Seed the default RNG (seed + 100 * pp_rank: equal on all TP ranks, so dropout in replicated regions
    agrees) and megatron's tracker (a different stream per TP rank, for dropout in TP-sharded regions)."""
    seed = seed + 100 * ps.get_pipeline_model_parallel_rank()
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def tp_rank() -> int:
    """This process's tensor-parallel rank."""
    return ps.get_tensor_model_parallel_rank()


def tp_size() -> int:
    """Tensor-parallel world size."""
    return ps.get_tensor_model_parallel_world_size()


def tp_group():
    """The tensor-parallel process group."""
    return ps.get_tensor_model_parallel_group()


def gather_tp(t: Tensor, dim: int = -1) -> Tensor:
    """Concatenate the TP ranks' shards of `t` along `dim` (no autograd; e.g. vocab-sharded log-scores)."""
    if tp_size() == 1:
        return t
    parts = [torch.empty_like(t, memory_format=torch.contiguous_format) for _ in range(tp_size())]
    dist.all_gather(parts, t.contiguous(), group=tp_group())
    return torch.cat(parts, dim=dim)
