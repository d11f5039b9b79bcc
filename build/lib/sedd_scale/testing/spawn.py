"""Run a function on N local processes joined by a gloo (CPU) process group and collect the results.

The tests' and benchmarks' real-process checks. Two things keep them fast and deterministic:
* Ranks are forked from a forkserver that imported torch, megatron-core and DeepSpeed once (~7 s of CPU per
  process otherwise): the server forks before any thread pool or process group exists, so it is fork-safe, and
  every rank still gets the parent's current environment, working directory and sys.path.
* The rendezvous store is created by the parent on a port the kernel picks (port 0) and held open while the
  ranks run: no "free port" is probed and released, so no other process can take it in between.
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

# Imported once by the forkserver, in this order (compat patches megatron-core and DeepSpeed as they load).
PRELOAD = ["sedd_scale.compat", "megatron.core", "deepspeed"]


def _entry(rank, world_size, port, fn, args, queue, group_timeout_s, threads, env):
    os.environ.clear()
    os.environ.update(env)  # the parent's environment now, not the forkserver's when it started
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    try:
        timeout = datetime.timedelta(seconds=group_timeout_s)
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timeout)
        # A timeout turns a hang (mismatched collectives) into an error instead of a stuck job.
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timeout)
        # Tensors crossing a process boundary as shared memory die with the worker: send bytes.
        buffer = io.BytesIO()
        torch.save(fn(*args), buffer)
        queue.put((rank, True, buffer.getvalue()))
    except BaseException:  # report any failure, including SystemExit, to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _context():
    """The forkserver context with the heavy imports preloaded (spawn where forkserver does not exist)."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def launch(fn: Callable, world_size: int, *args, timeout: float = 600.0, group_timeout_s: float = 120.0,
           threads: int = 1) -> list:
    """Call fn(*args) on ranks 0..world_size-1 (forked CPU processes, gloo); return the per-rank results.

    `fn` must be importable (module level). A rank that raises fails the whole call with its traceback.
    """
    ctx = _context()
    queue = ctx.SimpleQueue()
    # The parent holds the store (rank 0's ranks connect to it); the kernel picks its port.
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=group_timeout_s))
    env = dict(os.environ)
    procs = [ctx.Process(target=_entry, args=(r, world_size, store.port, fn, args, queue, group_timeout_s, threads,
                                              env),
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
