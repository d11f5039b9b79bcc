"""Run a function on N local processes joined by a gloo (CPU) process group and collect the results.

Used where a job needs a given world size on one machine without a launcher: checkpoint
conversion (a layout's ranks, on CPU, on any node) and the tests' real-process checks.
"""
from __future__ import annotations

import datetime
import io
import os
import time
import traceback
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank, world_size, port, fn, args, queue, group_timeout_s, threads):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    try:
        # A timeout turns a hang (mismatched collectives) into an error instead of a stuck job.
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=group_timeout_s))
        # Tensors crossing a process boundary as shared memory die with the worker: send bytes.
        buffer = io.BytesIO()
        torch.save(fn(*args), buffer)
        queue.put((rank, True, buffer.getvalue()))
    except BaseException:  # report any failure, including SystemExit, to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(fn: Callable, world_size: int, *args, timeout: float = 600.0, group_timeout_s: float = 120.0,
           threads: int = 1) -> list:
    """Call fn(*args) on ranks 0..world_size-1 (spawned CPU processes, gloo); return the per-rank results.

    `fn` must be importable (module level). A rank that raises fails the whole call with its traceback.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    from sedd_scale.distributed.parallel import free_port  # here: workers importing this module skip megatron

    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, queue, group_timeout_s, threads),
                         daemon=False)  # not daemonic: ranks may start DataLoader workers
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, []
    deadline = time.monotonic() + timeout
    while len(results) + len(errors) < world_size:
        if time.monotonic() > deadline or not any(p.is_alive() for p in procs) and queue.empty():
            break
        if queue.empty():
            for p in procs:
                p.join(timeout=0.05)
            continue
        rank, ok, value = queue.get()
        if ok:
            results[rank] = torch.load(io.BytesIO(value), weights_only=False)
        else:
            errors.append(f"rank {rank}:\n{value}")
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
    if errors:
        raise RuntimeError("distributed worker failed\n" + "\n".join(errors))
    if len(results) != world_size:
        raise RuntimeError(f"only ranks {sorted(results)} of {world_size} reported (crash or timeout)")
    return [results[r] for r in range(world_size)]
