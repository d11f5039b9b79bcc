"""Training loader: bytes of shard files one DP rank touches per epoch vs the bytes of rows it receives, tokens/s,
and the loader's time per cpu-tiny step.

    python benchmarks/bench_loader.py [--sequences 65536] [--dp 1 8 64] [--workers 2] [--micro-batch 8]

Writes a synthetic GPT-2-vocabulary dataset (uint16 ids, seq 1024, 16 KiB samples) to a temporary
directory, then prints three tables:

1. Read volume: for each DP size, rank 0's TokenLoader (2 DataLoader workers, global batch 512)
   runs one epoch with the page cache emptied for the shards first (POSIX_FADV_DONTNEED), and
   `fincore` counts the shard and sidecar bytes resident afterwards: what the rank touched, read()
   or otherwise. Target: <= 1.5x the bytes of the rows received at DP 8. Workers prefetch: the
   count includes up to one micro-batch per worker beyond the epoch (prefetch_factor=1), an
   overestimate of at most 2 / (micro-batches) shown in the table.
2. Throughput at DP 1 (all rows, warm page cache), workers 0 and 2, CRC32 checks on and off.
   Target: >= 5M tokens/s per process with 2 workers.
3. The loader's time per step of recipes/cpu-tiny.yaml's shape (seq 128, micro-batch 16, global
   batch 32), in-process (no prefetching to hide it), against that recipe's ~0.4 s step.

Timings depend on the machine and what else runs on it.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sedd_scale.data.loader import LoaderConfig, TokenLoader
from sedd_scale.data.manifest import Manifest, TokenizerInfo
from sedd_scale.data.prepare import write_sequences
from sedd_scale.data.tar_layout import default_seqs_per_sample

CPU_TINY_STEP_S = 0.4  # README: ~4 minutes for 600 steps on 2 cores


def drop_cache(files: list[str]) -> None:
    """Empty the page cache of `files` (written back first, since dirty pages cannot be dropped)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_bytes(files: list[str]) -> int:
    """Bytes of `files` in the page cache (util-linux fincore)."""
    fincore = shutil.which("fincore")
    if fincore is None:
        raise SystemExit("fincore (util-linux) is needed to count resident pages")
    out = subprocess.run([fincore, "--bytes", "--noheadings", "--output", "RES", *files], capture_output=True,
                         text=True, check=True).stdout
    return sum(int(line) for line in out.split())


def read_volume(manifest: str, dp: int, args) -> dict:
    """One epoch of rank 0 at `dp` ranks from an empty page cache: bytes received and touched."""
    m = Manifest.load(manifest)
    refs = m.shard_refs("train")
    tars, crcs = [r.tar for r in refs], [r.crc for r in refs]
    config = LoaderConfig([manifest], m.seq_len, args.micro_batch, num_workers=args.workers, prefetch_factor=1,
                          global_batch=args.global_batch)
    loader = TokenLoader(config, 0, dp)
    micro_batches = m.splits["train"].num_sequences // args.global_batch * loader.grad_accum
    drop_cache(tars + crcs)
    assert resident_bytes(tars + crcs) == 0, "the page cache could not be emptied for the shards"
    it = iter(loader)
    for _ in range(micro_batches):
        next(it)
    tar_bytes, crc_bytes = resident_bytes(tars), resident_bytes(crcs)
    del it
    received = micro_batches * args.micro_batch * m.layout.row_bytes
    return {"dp": dp, "micro": micro_batches, "received": received, "tar": tar_bytes, "crc": crc_bytes,
            "ratio": (tar_bytes + crc_bytes) / received, "prefetch": args.workers / micro_batches}


def throughput(manifest: str, seq_len: int, micro_batch: int, global_batch: int, workers: int, verify: bool,
               batches: int) -> float:
    """Tokens per second over `batches` micro-batches (after the first, which includes worker start-up)."""
    loader = TokenLoader(LoaderConfig([manifest], seq_len, micro_batch, num_workers=workers, verify_crc=verify,
                                      global_batch=global_batch))
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    checksum = 0
    for _ in range(batches):
        checksum += int(next(it)[0, 0])  # touch the data so nothing is optimised away
    return batches * micro_batch * seq_len / (time.perf_counter() - start)


def cpu_tiny_step_ms(tmp: Path, steps: int = 200) -> float:
    """Milliseconds of loader work per cpu-tiny step (2 micro-batches of 16 x 128 byte tokens), no workers."""
    rng = np.random.default_rng(1)
    write_sequences(tmp / "tiny", {"train": rng.integers(0, 257, size=(8192, 128), dtype=np.uint16)},
                    TokenizerInfo("byte", 257, 256), 64, 4096)
    loader = TokenLoader(LoaderConfig([str(tmp / "tiny" / "manifest.json")], 128, 16, global_batch=32))
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    for _ in range(2 * steps - 1):
        next(it)
    return (time.perf_counter() - start) / (steps - 0.5) * 1e3


def main() -> None:
    """Build the dataset, measure, print the tables."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--sequences", type=int, default=65536)
    p.add_argument("--seqs-per-shard", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--global-batch", type=int, default=512)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--dp", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--batches", type=int, default=3000, help="micro-batches timed per throughput row")
    args = p.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    seqs = rng.integers(0, 50257, size=(args.sequences, args.seq_len), dtype=np.uint16)
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        m = write_sequences(Path(tmp) / "d", {"train": seqs}, TokenizerInfo("gpt2", 50257, 50256),
                            default_seqs_per_sample(args.seq_len, 2), args.seqs_per_shard)
        manifest = m.location
        os.sync()
        print(f"{args.sequences} sequences x {args.seq_len} tokens ({seqs.nbytes / 2**20:.0f} MiB) in "
              f"{len(m.splits['train'].shards)} shards, {m.seqs_per_sample} sequences per sample; "
              f"global batch {args.global_batch}, micro-batch {args.micro_batch}, {args.workers} workers\n")
        print("1. Bytes of shard files touched by rank 0 in one epoch (page cache emptied first, fincore after)")
        print(f"{'DP':>4} {'micro-batches':>13} {'rows received':>14} {'tar touched':>12} {'crc touched':>12} "
              f"{'touched/received':>17} {'prefetch bound':>15}")
        for dp in args.dp:
            r = read_volume(manifest, dp, args)
            print(f"{r['dp']:>4} {r['micro']:>13} {r['received'] / 2**20:>10.2f} MiB {r['tar'] / 2**20:>8.2f} MiB "
                  f"{r['crc'] / 2**10:>8.0f} KiB {r['ratio']:>16.3f}x {'+' + format(r['prefetch'], '.1%'):>15}")
        print("\n2. Throughput at DP 1, page cache warm")
        print(f"{'workers':>8} {'CRC32':>6} {'M tokens/s':>11}")
        batches = min(args.batches, args.sequences // args.micro_batch - 2 * args.workers - 2)
        for workers in sorted({0, args.workers}):
            for verify in (True, False):
                rate = throughput(manifest, args.seq_len, args.micro_batch, args.global_batch, workers, verify,
                                  batches)
                print(f"{workers:>8} {str(verify):>6} {rate / 1e6:>11.1f}")
        ms = cpu_tiny_step_ms(Path(tmp))
        print(f"\n3. Loader time per cpu-tiny step (seq 128, micro-batch 16, global batch 32, no workers): "
              f"{ms:.2f} ms = {ms / 1e3 / CPU_TINY_STEP_S:.2%} of its ~{CPU_TINY_STEP_S} s step")


if __name__ == "__main__":
    main()
