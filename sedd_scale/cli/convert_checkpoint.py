"""Convert and reshard checkpoints; every conversion rereads what it wrote and compares it.

    # a training checkpoint (run dir or step folder, any TP/PP/DP/ZeRO) -> consolidated safetensors
    python tools/convert_checkpoint.py consolidate runs/x runs/x-ema --weights ema
    python tools/convert_checkpoint.py consolidate runs/x/step_000010000 full --weights raw --training-state

    # the same training state under another layout (optimizer, EMA, LR schedule, data position)
    python tools/convert_checkpoint.py reshard runs/x runs/x-tp4 --tp 4 --pp 1 --dp 2 --zero-stage 1

    # a consolidated directory -> a training checkpoint (exact resume when it has --training-state,
    # otherwise a fresh start from its weights, e.g. fine-tuning a hub model; --recipe supplies the rest)
    python tools/convert_checkpoint.py shard full runs/y --tp 2 --pp 2 [--recipe recipes/x.yaml] [--set k=v]

    # consolidated <-> the reference's hub format (config.json + model.safetensors)
    python tools/convert_checkpoint.py to-hub runs/x-ema hub-dir
    python tools/convert_checkpoint.py from-hub hub-dir consolidated-dir [--vocab-multiple 128]

    python tools/convert_checkpoint.py describe PATH

consolidate, to-hub and from-hub write weights above --max-shard-size (default 5GB, as transformers) as
model-0000i-of-0000N.safetensors shards plus model.safetensors.index.json (the Hugging Face convention).

Sharded steps run the layout's ranks as local CPU processes (gloo): no GPUs or launcher needed,
memory is the whole training state once plus one layout's shards. Outputs are written under a
temporary name and renamed into place after verification; an existing output is never touched.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from sedd_scale.checkpoint.consolidated import ConsolidatedError
from sedd_scale.checkpoint.hub import HubFormatError
from sedd_scale.checkpoint.safetensors_shards import DEFAULT_SHARD_BYTES, parse_size
from sedd_scale.checkpoint.sharded import CheckpointError
from sedd_scale.config import RecipeError


def _layout_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--cp", type=int, default=1, help="context-parallel size (parallel.context_parallel)")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages")
    p.add_argument("--dp", type=int, default=1, help="data-parallel size (world = tp * cp * pp * dp)")
    p.add_argument("--zero-stage", type=int, default=None, help="ZeRO stage (default: the recipe's)")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="sequences per rank per forward (default: the recipe's; the global batch never changes)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="other recipe overrides for the new checkpoint, e.g. --set train.steps=20000")


def _shard_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-shard-size", type=parse_size, default=DEFAULT_SHARD_BYTES, metavar="SIZE",
                   help="weights above this (5GB, 500MB, 2GiB or bytes) are written as shards with an index")


def parser() -> argparse.ArgumentParser:
    """The command line."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("consolidate", help="training checkpoint -> consolidated directory")
    p.add_argument("checkpoint")
    p.add_argument("out")
    p.add_argument("--weights", choices=("ema", "raw"), default="ema")
    p.add_argument("--training-state", action="store_true",
                   help="also write optimizer moments, EMA and counters (what `shard` needs to resume exactly)")
    _shard_arg(p)
    p = sub.add_parser("reshard", help="training checkpoint -> training checkpoint under another layout")
    p.add_argument("checkpoint")
    p.add_argument("out")
    _layout_args(p)
    p = sub.add_parser("shard", help="consolidated directory -> training checkpoint under a layout")
    p.add_argument("consolidated")
    p.add_argument("out")
    p.add_argument("--recipe", default=None,
                   help="recipe YAML (needed when the directory carries none, e.g. from a hub)")
    _layout_args(p)
    p = sub.add_parser("to-hub", help="consolidated directory -> the reference's hub format")
    p.add_argument("consolidated")
    p.add_argument("out")
    _shard_arg(p)
    p = sub.add_parser("from-hub", help="the reference's hub format -> consolidated directory")
    p.add_argument("hub")
    p.add_argument("out")
    p.add_argument("--vocab-multiple", type=int, default=None,
                   help="pad the vocabulary to this multiple when the model is built (ours: 128)")
    _shard_arg(p)
    p = sub.add_parser("describe", help="what a checkpoint directory is and holds")
    p.add_argument("path")
    return ap


def run(args: argparse.Namespace) -> dict:
    """Execute one parsed command; returns its summary."""
    from sedd_scale.apps import convert

    if args.command == "consolidate":
        return convert.consolidate(args.checkpoint, args.out, weights=args.weights, training_state=args.training_state,
                                   max_shard_bytes=args.max_shard_size)
    layout = {k: getattr(args, k, None) for k in ("tp", "cp", "pp", "dp", "zero_stage", "micro_batch")}
    if args.command == "reshard":
        return convert.reshard(args.checkpoint, args.out, overrides=args.overrides, **layout)
    if args.command == "shard":
        return convert.shard(args.consolidated, args.out, recipe=args.recipe, overrides=args.overrides, **layout)
    if args.command == "to-hub":
        return {"out": str(convert.to_hub(args.consolidated, args.out, max_shard_bytes=args.max_shard_size))}
    if args.command == "from-hub":
        overrides = {} if args.vocab_multiple is None else {"vocab_multiple": args.vocab_multiple}
        return {"out": str(convert.from_hub(args.hub, args.out, max_shard_bytes=args.max_shard_size, **overrides))}
    return convert.describe(args.path)


def main(argv: list[str] | None = None) -> int:
    """Run the command; a bad input exits with 2 and a message naming the fix."""
    from sedd_scale.apps.convert import ConversionError

    args = parser().parse_args(argv)
    started = time.perf_counter()
    try:
        summary = run(args)
    except (ConversionError, ConsolidatedError, HubFormatError, CheckpointError, RecipeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({**summary, "seconds": round(time.perf_counter() - started, 1)}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
