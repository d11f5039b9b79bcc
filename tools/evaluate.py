"""Distributed ELBO evaluation: nats/token, the perplexity upper bound, its standard error, token count.

    python tools/evaluate.py runs/cpu-tiny --split test                       # one process
    torchrun --nproc-per-node 8 tools/evaluate.py runs/x --split test --draws 16 --out x-test.json
    python tools/evaluate.py hub-or-consolidated-dir --protocol ptb          # the paper's zero-shot PTB

CHECKPOINT is a training checkpoint (run dir or step folder; evaluated in its own layout, so launch
as many ranks as it was trained with), or a consolidated / hub directory (TP and PP from --tp/--pp,
default the trained layout; DP = the remaining ranks). Data-parallel ranks split the batches; each
batch's noise comes from (seed, batch index), so any DP size gives the same result. Every sequence
gets --draws t over the whole noise range, plus the prior term: the draws form R independent
replicates (R = the smallest factor >= 2 of --draws: 2 for an even count), each a stratified design
(antithetic pairs by default). Two errors are reported: `stderr`, the Monte-Carlo error (what another
--seed changes; from the replicates' spread), and `data_stderr`, the error over the choice of
sequences (what another test set of as many sequences from the same source changes, its noise
included; from the spread over batches, null with a single batch). An empty split is refused.

--protocol ptb: the SEDD paper's zero-shot Penn Treebank number: the official test split,
detokenized like the reference, GPT-2 tokens with EOS after each line, cut into blocks of the
model's length (no sliding window, the remainder dropped); prepared once into $SEDD_CACHE.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from itertools import islice
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
# torch, megatron and the checkpoint code are imported where used, so a wrong flag is answered at once.


class EvaluationError(ValueError):
    """A request that cannot be evaluated as asked."""


def parser() -> argparse.ArgumentParser:
    """The command line."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--manifest", default=None, help="data manifest.json (default: the recipe's validation data)")
    ap.add_argument("--split", default=None, help="split to evaluate (default: test when present, else valid)")
    ap.add_argument("--protocol", choices=("ptb",), default=None, help="the paper's zero-shot PTB test protocol")
    ap.add_argument("--draws", type=int, default=8,
                    help="Monte-Carlo t draws per sequence, split into independent replicates (8 = 2 x 4)")
    ap.add_argument("--no-antithetic", dest="antithetic", action="store_false", help="independent draws per stratum")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=None,
                    help="sequences per rank per forward (default: the recipe's micro-batch)")
    ap.add_argument("--max-batches", type=int, default=None, help="evaluate only the first N batches per rank")
    ap.add_argument("--weights", choices=("ema", "raw"), default="ema",
                    help="training checkpoints: EMA or raw weights (other formats hold one set)")
    ap.add_argument("--tp", type=int, default=None, help="consolidated/hub: tensor-parallel size")
    ap.add_argument("--pp", type=int, default=None, help="consolidated/hub: pipeline stages")
    ap.add_argument("--out", default=None, help="results JSON (written atomically by rank 0)")
    ap.add_argument("--tensorboard", default=None, help="tensorboard log dir for the results")
    return ap


def _ptb_manifest(length: int, num_tokens: int) -> Path:
    """The PTB test blocks for a model of `length` tokens (prepared once; rank 0 prepares, the others wait)."""
    import torch.distributed as dist

    from sedd_scale.data.fetch import cache_dir

    if num_tokens != 50257:
        raise EvaluationError("--protocol ptb needs a GPT-2-vocabulary model (50257 tokens); this one has "
                              f"{num_tokens}")
    out = cache_dir() / "eval" / f"ptb-gpt2-{length}"
    if dist.get_rank() == 0 and not _readable_manifest(out / "manifest.json"):
        import shutil

        from sedd_scale.data.corpora import load_corpus
        from sedd_scale.data.prepare import PrepareConfig, prepare

        if out.exists():  # our own cache, written by an older data format: rebuilt, not misread
            print(f"[evaluate] rebuilding the PTB cache {out} (written in an older data format)", file=sys.stderr)
            shutil.rmtree(out)
        # One worker: no fork inside a process that already runs gloo and OpenMP threads (a forked child
        # can deadlock on a lock one of them held); PTB takes seconds.
        prepare(load_corpus("ptb"), PrepareConfig(out=out, tokenizer="gpt2", seq_len=length, progress=False, workers=1),
                {"corpus": "ptb", "protocol": "SEDD zero-shot: detokenized test split, EOS per line, blocks"})
    dist.barrier()
    return out / "manifest.json"


def _readable_manifest(path: Path) -> bool:
    """Whether `path` is a manifest this code reads (False: missing, or another format version)."""
    from sedd_scale.data.manifest import Manifest, ManifestError

    if not path.is_file():
        return False
    try:
        Manifest.load(path)
    except ManifestError:
        return False
    return True


def _choose_split(manifest: str, requested: str | None) -> str:
    """The split to evaluate (default: test when present, else valid); a missing or empty one is refused."""
    from sedd_scale.data.manifest import Manifest

    splits = Manifest.load(manifest).splits
    split = requested or ("test" if "test" in splits else "valid")
    if split not in splits or splits[split].num_sequences == 0:
        have = ", ".join(f"{name} ({info.num_sequences} sequences)" for name, info in splits.items())
        state = "has no" if split not in splits else "holds no sequences in its"
        raise EvaluationError(f"{manifest} {state} split {split!r}: nothing to evaluate; pass --split with a "
                              f"non-empty one ({have}) or another --manifest")
    return split


def _recipe_for_weights(weights, manifest: str, *, tp: int, pp: int, micro_batch: int, dp: int) -> dict:
    """A recipe (as data) to run weights-only `weights` under TP x PP x DP: the saved one when there is one."""
    from sedd_scale.config import DiffusionConfig, to_dict

    model = to_dict(weights.config)
    data = copy.deepcopy(weights.recipe) if weights.recipe else {
        "model": model, "data": {"manifests": [manifest], "tokenizer": None, "seq_len": model["length"]}}
    data["diffusion"] = {**data.get("diffusion", {}), **DiffusionConfig.section_for(weights.noise)}
    data["parallel"] = {"tp": tp, "pp": pp, "zero_stage": 0, "micro_batch": micro_batch,
                        "global_batch": micro_batch * dp}
    data["checkpoint"] = {"dir": os.devnull, "resume": False}
    return data


def training_step(path: Path) -> Path | None:
    """The step folder of a training checkpoint (run directory or step folder), or None for a consolidated or hub
    directory; EvaluationError for anything else. Cheap: called before any process group."""
    from sedd_scale.apps import convert
    from sedd_scale.checkpoint import consolidated as cons
    from sedd_scale.checkpoint import hub

    if not path.exists():
        raise EvaluationError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        raise EvaluationError(f"checkpoint {path} is a file: pass a checkpoint directory")
    if cons.is_consolidated(path) or (path / hub.CONFIG_FILE).is_file():
        return None
    try:
        return convert.find_step(path)
    except convert.ConversionError as e:
        raise EvaluationError(f"{e}: pass a training checkpoint (run directory or step_* folder), or a consolidated "
                              "or hub directory (config.json + model.safetensors)") from None


def build(args, world: int, step: Path | None):
    """The trainer holding the checkpoint's weights under the evaluation layout, and the recipe (`step`: the
    training checkpoint's step folder, None for a consolidated or hub directory)."""
    from sedd_scale.apps import convert
    from sedd_scale.checkpoint import full_state
    from sedd_scale.checkpoint.sharded import ANY_LAYOUT, read_meta
    from sedd_scale.pretrained import read_weights

    path = Path(args.checkpoint)
    if step is None:
        weights = read_weights(path)
        trained = (weights.recipe or {}).get("parallel", {})
        tp, pp = args.tp or trained.get("tp", 1), args.pp or trained.get("pp", 1)
        if world % (tp * pp):
            raise EvaluationError(f"{world} ranks cannot hold TP {tp} x PP {pp}: launch a multiple of {tp * pp}")
        recipe = _recipe_for_weights(weights, args.manifest or "unused", tp=tp, pp=pp, dp=world // (tp * pp),
                                     micro_batch=args.batch_size or trained.get("micro_batch", 8))
        trainer = convert.build_trainer(recipe)
        full_state.load(trainer, {"weights": weights.tensors}, None)  # the EMA starts as these weights
        return trainer, recipe
    meta = read_meta(step)
    if meta["layout"] != ANY_LAYOUT and meta["world_size"] != world:  # a resharded (layout-free) step runs anywhere
        raise EvaluationError(f"{step} was written by {meta['world_size']} ranks and is evaluated in its own layout: "
                              f"launch {meta['world_size']} ranks, or consolidate it first "
                              "(tools/convert_checkpoint.py consolidate) to evaluate under any layout")
    if args.tp or args.pp:
        raise EvaluationError("--tp/--pp apply to consolidated and hub checkpoints; a training checkpoint runs "
                              "in its trained layout")
    recipe = {**meta["recipe"], "checkpoint": {"dir": str(step.parent), "resume": False}}
    trainer = convert.build_trainer(recipe)
    trainer.load(step)
    return trainer, recipe


def run(args) -> dict | None:
    """Evaluate on every rank; rank 0 returns (and writes) the results."""
    from sedd_scale.diffusion.elbo import replicate_split

    if args.draws < 2:
        raise EvaluationError(f"--draws must be >= 2 (a standard error needs two), got {args.draws}")
    replicates, _ = replicate_split(args.draws)
    if args.max_batches is not None and args.max_batches < 1:
        raise EvaluationError(f"--max-batches must be >= 1, got {args.max_batches}")
    if args.out and Path(args.out).exists():
        raise EvaluationError(f"{args.out} exists: choose another --out (results are never overwritten)")
    if args.manifest and not args.protocol:
        _choose_split(args.manifest, args.split)  # an empty split fails before any process group or model
    step = training_step(Path(args.checkpoint))  # so does a folder that is no checkpoint

    import sedd_scale.compat  # noqa: F401  (before megatron-core / DeepSpeed)

    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from sedd_scale.data.loader import EvalLoader
    from sedd_scale.distributed import engine
    from sedd_scale.train.metrics import Metrics

    started = time.perf_counter()
    engine.init_world()
    trainer, recipe = build(args, dist.get_world_size(), step)
    cfg = trainer.model_cfg
    if args.protocol == "ptb":
        manifest, split = str(_ptb_manifest(cfg.length, cfg.num_tokens)), "test"
    else:
        data = recipe["data"]
        manifest = args.manifest or data.get("valid") or data["manifests"][0]
        split = _choose_split(manifest, args.split)
    layout = trainer.layout
    loader = EvalLoader(manifest, split, args.batch_size or layout.micro_batch, ps.get_data_parallel_rank(),
                        layout.dp)
    loader.check_compatible(cfg.num_tokens, cfg.length)
    batches = len(loader) if args.max_batches is None else min(len(loader), args.max_batches)
    rank0 = dist.get_rank() == 0
    metrics = Metrics(args.tensorboard or os.devnull, total_steps=batches, enabled=rank0 and bool(args.tensorboard))
    bar = None
    if rank0 and not args.tensorboard:
        from tqdm import tqdm

        bar = tqdm(total=batches, unit="batch", dynamic_ncols=True, mininterval=1.0)
    estimate = trainer.validate(islice(loader, batches), args.draws, antithetic=args.antithetic, seed=args.seed,
                                ema=args.weights == "ema", progress=(bar.update if bar else metrics.advance))
    if bar:
        bar.close()
    data_stderr = estimate.data_stderr if math.isfinite(estimate.data_stderr) else None  # null: a single batch
    result = {"checkpoint": str(args.checkpoint), "step": trainer.step, "manifest": manifest, "split": split,
              "protocol": args.protocol, "weights": args.weights, "nats_per_token": estimate.nats_per_token,
              "stderr": estimate.stderr, "data_stderr": data_stderr, "perplexity_bound": estimate.perplexity_bound,
              "tokens": estimate.num_tokens, "sequences": estimate.num_sequences, "batches": len(estimate.groups),
              "draws": args.draws, "replicates": replicates, "antithetic": args.antithetic, "seed": args.seed,
              "layout": layout.describe(), "seconds": round(time.perf_counter() - started, 1)}
    scalars = {f"eval/{split}/elbo_nats_per_token": estimate.nats_per_token,
               f"eval/{split}/elbo_stderr": estimate.stderr,
               f"eval/{split}/perplexity_bound": estimate.perplexity_bound}
    if data_stderr is not None:
        scalars[f"eval/{split}/elbo_data_stderr"] = data_stderr
    metrics.scalars(trainer.step, scalars)
    metrics.close()
    if rank0 and args.out:
        from sedd_scale.checkpoint.sharded import atomic_write_text

        atomic_write_text(Path(args.out), json.dumps(result, indent=2))
    return result if rank0 else None


def main(argv: list[str] | None = None) -> int:
    """Parse, evaluate, print the table on rank 0; bad input exits with 2 and the reason."""
    args = parser().parse_args(argv)
    import torch.distributed as dist

    from sedd_scale.checkpoint.consolidated import ConsolidatedError
    from sedd_scale.checkpoint.hub import HubFormatError
    from sedd_scale.checkpoint.sharded import CheckpointError
    from sedd_scale.config import RecipeError
    from sedd_scale.data.manifest import ManifestError
    from sedd_scale.data.shards import ShardError
    from sedd_scale.data.urlcache import UrlError

    try:
        result = run(args)
    except (EvaluationError, ConsolidatedError, HubFormatError, CheckpointError, RecipeError, ManifestError,
            ShardError, UrlError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result is not None:
        width = max(len(k) for k in result)
        print("\n".join(f"{k:<{width}}  {v}" for k, v in result.items()), flush=True)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
