"""Training-loader throughput (tokens/s) at sequence length 1024, in one process and with workers.

    python benchmarks/bench_loader.py [--sequences 16384] [--micro-batch 8] [--workers 0 2]

Writes a synthetic GPT-2-vocabulary dataset (uint16 shards) to a temporary directory, then times
the first pass over it (every shard read from disk, sha256-checked and decoded; page cache warm)
and prints a table. Target: >= 5M tokens/s in one process.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sedd_scale.data.loader import LoaderConfig, TokenLoader  # noqa: E402
from sedd_scale.data.manifest import TokenizerInfo  # noqa: E402
from sedd_scale.data.prepare import write_sequences  # noqa: E402


def measure(manifest: str, seq_len: int, micro_batch: int, workers: int, batches: int, verify: bool) -> float:
    """Tokens per second over `batches` batches (after the first, which includes worker start-up)."""
    loader = TokenLoader(LoaderConfig([manifest], seq_len, micro_batch, num_workers=workers, verify_sha256=verify))
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    checksum = 0
    for _ in range(batches):
        checksum += int(next(it)[0, 0])  # touch the data so nothing is optimised away
    return batches * micro_batch * seq_len / (time.perf_counter() - start)


def main() -> None:
    """Build the dataset, time each configuration, print the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--sequences", type=int, default=16384)
    p.add_argument("--seqs-per-shard", type=int, default=1024)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = p.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    seqs = rng.integers(0, 50257, size=(args.sequences, args.seq_len), dtype=np.uint16)
    batches = args.sequences // args.micro_batch - 2 * max(args.workers) - 2  # one epoch, less warm-up/prefetch
    with tempfile.TemporaryDirectory() as tmp:
        write_sequences(Path(tmp), {"train": seqs}, TokenizerInfo("gpt2", 50257, 50256), 64, args.seqs_per_shard)
        manifest = str(Path(tmp) / "manifest.json")
        print(f"{args.sequences} sequences x {args.seq_len} tokens ({seqs.nbytes / 2**20:.0f} MiB) in "
              f"{args.sequences // args.seqs_per_shard} shards, micro batch {args.micro_batch}, {batches} batches")
        print(f"{'workers':>8} {'sha256':>7} {'M tokens/s':>11}")
        for workers in args.workers:
            for verify in (True, False):
                rate = measure(manifest, args.seq_len, args.micro_batch, workers, batches, verify)
                print(f"{workers:>8} {str(verify):>7} {rate / 1e6:>11.1f}")


if __name__ == "__main__":
    main()
