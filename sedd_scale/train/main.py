"""Training entry point, started by launcher.sh on every rank: `python -m sedd_scale.train RECIPE [--set k=v ...]`.

Exit codes: 0 done; 2 bad input (recipe, data, run directory), before any process group where it can
be known then; 1 a fault the message names (non-finite updates, a full disk, a failed checkpoint
write); 143 (128 + SIGTERM) after a pre-emption checkpoint, so that schedulers requeue the job
(`SEDD_STOP_EXIT_CODE` overrides it: launcher.sh sets 0 under torchrun, which reports any other code
as a crash, and exits 143 itself).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from sedd_scale.checkpoint.consolidated import ConsolidatedError
from sedd_scale.checkpoint.hub import HubFormatError
from sedd_scale.checkpoint.run_lock import RunDirBusy
from sedd_scale.checkpoint.sharded import CheckpointError
from sedd_scale.config import RecipeError, add_recipe_args, load_recipe, overrides_from_args
from sedd_scale.config.changes import ResumeRefused
from sedd_scale.data.manifest import ManifestError
from sedd_scale.data.shards import ShardError
from sedd_scale.data.urlcache import UrlError
from sedd_scale.train import run_dir
from sedd_scale.train.init_from import InitFromError
from sedd_scale.train.metrics import MetricsError
from sedd_scale.train.quiet import silence_known_noise
from sedd_scale.train.wandb_sink import check_available as check_wandb

DEFAULT_RECIPE = "cpu-tiny"  # the packaged recipes/cpu-tiny.yaml


def main(argv: list[str] | None = None) -> int:
    """Load and validate the recipe, build the process groups, print the layout, then train."""
    parser = argparse.ArgumentParser(description=__doc__)
    add_recipe_args(parser, default=DEFAULT_RECIPE)
    parser.add_argument("--layout-only", action="store_true",
                        help="build the process groups, print each rank's place in the layout and exit "
                             "(a cheap check of an allocation before a long job)")
    args = parser.parse_args(argv)
    silence_known_noise()  # before megatron-core and DeepSpeed load: their known-harmless warnings
    try:
        recipe = load_recipe(args.recipe, overrides_from_args(args))
        check_wandb(recipe.train.wandb)
        # The run directory and the data are checked before any process group (WORLD_SIZE as engine.setup reads it).
        start = run_dir.check_start(recipe, int(os.environ.get("WORLD_SIZE", "1")))
        manifest = Path(recipe.data.manifests[0])
        if not manifest.exists() and not recipe.data.prepare:
            raise RecipeError(f"data.manifests[0] = {manifest} does not exist: prepare it with tools/prepare_data.py "
                              "(... --out DIR writes DIR/manifest.json), or set data.prepare to a built-in corpus "
                              "(ptb, bible, wiki)")
    except (RecipeError, ResumeRefused, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from sedd_scale.distributed import engine  # heavy imports (megatron, deepspeed) only once the recipe is valid

    layout, topology = engine.setup(recipe)
    import torch.distributed as dist

    if dist.get_rank() == 0:
        print(f"layout: {layout.describe()}", flush=True)
    print(engine.describe_rank(), flush=True)
    if args.layout_only:
        dist.barrier()
        dist.destroy_process_group()
        return 0
    try:
        with take_run_dir(recipe, start):
            result = run(recipe, layout, topology, start)
    except (RunDirBusy, ManifestError, ShardError, UrlError, InitFromError, ConsolidatedError,
            HubFormatError) as e:  # bad input found once the processes exist
        print(f"error: {e}", file=sys.stderr)
        dist.destroy_process_group()
        return 2
    except (FloatingPointError, MetricsError) as e:  # non-finite updates, a full disk: the message says what to do
        if dist.get_rank() == 0:  # the same message on every rank
            print(f"error: {e}", file=sys.stderr)
        dist.destroy_process_group()
        return 1
    except CheckpointError as e:  # a checkpoint write failed: the rank that failed names the file
        print(f"error: rank {dist.get_rank()}: {e}", file=sys.stderr)
        dist.destroy_process_group()
        return 1
    dist.barrier()
    dist.destroy_process_group()
    if result.stopped_by_signal:  # 128 + SIGTERM: schedulers requeue such jobs
        return int(os.environ.get("SEDD_STOP_EXIT_CODE", "143"))
    return 0


@contextmanager
def take_run_dir(recipe, start: run_dir.RunStart):
    """Rank 0 locks the run directory for the run (refusing a busy one on every rank), discards the old
    checkpoints when starting over, puts back a step folder an interrupted re-save set aside, and removes
    leftovers of crashed saves."""
    import torch.distributed as dist

    from sedd_scale.checkpoint.run_lock import RunLock
    from sedd_scale.checkpoint.sharded import CheckpointDir

    lock, outcome = RunLock(recipe.checkpoint.dir), [None]
    if dist.get_rank() == 0:
        try:
            lock.acquire()
            if not lock.supported:
                print(f"warning: {lock.path.parent}'s filesystem has no flock(2): the run directory is not locked "
                      "against a second trainer", file=sys.stderr, flush=True)
            if start.start_over:
                gone = run_dir.start_over(recipe.checkpoint.dir)
                print(f"start over: deleted {len(gone)} checkpoint folder(s) of {recipe.checkpoint.dir}", flush=True)
            ckpts = CheckpointDir(recipe.checkpoint.dir)
            for step in ckpts.restore_set_aside():  # before clean_stale: it is the only intact copy of that step
                print(f"restored {step}: a re-save of it was interrupted between its two renames", flush=True)
            ckpts.clean_stale()
        except RunDirBusy as e:
            outcome = [str(e)]
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        raise RunDirBusy(outcome[0])
    try:
        yield
    finally:
        lock.release()


def prepare_missing_data(recipe) -> None:
    """Rank 0 prepares `data.prepare` (a built-in corpus) into manifests[0] when that is missing."""
    import torch.distributed as dist

    manifest, failure = Path(recipe.data.manifests[0]), [None]
    if dist.get_rank() == 0 and not manifest.exists():  # main() refused a missing manifest without data.prepare
        from sedd_scale.data.corpora import load_corpus
        from sedd_scale.data.prepare import PrepareConfig, prepare

        print(f"preparing {recipe.data.prepare} ({recipe.data.tokenizer} tokens, length {recipe.data.seq_len}) "
              f"into {manifest.parent}", flush=True)
        config = PrepareConfig(out=manifest.parent, tokenizer=recipe.data.tokenizer, seq_len=recipe.data.seq_len)
        try:
            prepare(load_corpus(recipe.data.prepare), config, {"corpus": recipe.data.prepare})
        except (OSError, RuntimeError, ValueError) as e:  # shared below, so the other ranks stop with rank 0
            failure = [f"preparing {recipe.data.prepare} into {manifest.parent} failed: {e}"]
    dist.broadcast_object_list(failure, src=0)
    if failure[0] is not None:
        raise ManifestError(failure[0])


def open_wandb(recipe, config: dict, start_step: int):
    """Rank 0's W&B run when the recipe asks for one (else None); a failure to start it (e.g. online without
    `wandb login`) stops every rank with MetricsError."""
    import torch.distributed as dist

    sink, failure = None, [None]
    if dist.get_rank() == 0 and recipe.train.wandb.enabled:
        import wandb

        from sedd_scale.train.wandb_sink import WandbSink

        try:
            sink = WandbSink(recipe.train.wandb, recipe.checkpoint.dir, config=config, start_step=start_step)
        except (wandb.Error, OSError) as e:  # shared below, so that the other ranks stop with rank 0
            failure = [f"could not start the Weights & Biases run (train.wandb): {e}: log in (wandb login), set "
                       "train.wandb.mode=offline, or remove train.wandb.project"]
    dist.broadcast_object_list(failure, src=0)
    if failure[0] is not None:
        raise MetricsError(failure[0])
    return sink


def run(recipe, layout, topology, start: run_dir.RunStart | None = None):
    """Data, trainer, resume, train (each validation ELBO printed as it is measured), then samples on rank 0."""
    import sedd_scale.compat  # noqa: F401  (before megatron-core / DeepSpeed)

    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from sedd_scale.config import to_dict
    from sedd_scale.config.changes import flatten
    from sedd_scale.data.checked import check_split
    from sedd_scale.data.loader import EvalLoader, LoaderConfig, TokenLoader, check_sources
    from sedd_scale.data.tokenizer import get_tokenizer
    from sedd_scale.train.init_from import load_init_weights
    from sedd_scale.train.metrics import Metrics
    from sedd_scale.train.run_summary import parameter_counts, start_lines
    from sedd_scale.train.trainer import Trainer

    prepare_missing_data(recipe)
    d, dp_rank = recipe.data, ps.get_data_parallel_rank()
    config = LoaderConfig(manifests=list(d.manifests), seq_len=d.seq_len, micro_batch=layout.micro_batch,
                          weights=d.weights, seed=recipe.train.seed, num_workers=d.num_workers,
                          global_batch=layout.global_batch, skip_corrupt=d.skip_corrupt, cache_dir=d.cache_dir)
    valid_manifest = d.valid or d.manifests[0]
    # A resumed run cannot leave a bad shard out or take re-prepared data: the advice for a bad shard says so.
    resuming = start is not None and start.latest is not None
    # Rank 0 loads the manifests and checks every shard's size once; every rank builds its loaders from that.
    checked = [None]
    if dist.get_rank() == 0:
        try:
            checked = [(check_sources(config, resuming=resuming),
                        check_split(valid_manifest, "valid", resuming=resuming, evaluation=True))]
        except (ManifestError, ShardError, ValueError) as e:  # raised on every rank below
            checked = [e]
    dist.broadcast_object_list(checked, src=0)
    if isinstance(checked[0], Exception):
        raise checked[0]
    train_checked, valid_checked = checked[0]
    loader = TokenLoader(config, dp_rank, layout.dp, checked=train_checked)
    loader.check_compatible(recipe.model.num_tokens, d.seq_len, tokenizer=d.tokenizer)
    evaluation = EvalLoader(valid_manifest, "valid", layout.micro_batch, dp_rank, layout.dp, cache_dir=d.cache_dir,
                            checked=valid_checked)
    evaluation.check_compatible(recipe.model.num_tokens, d.seq_len, tokenizer=d.tokenizer)
    valid = [b for b, _ in zip(evaluation, range(recipe.train.eval_batches))]
    rank0 = dist.get_rank() == 0
    if loader.skipped_shards and rank0:
        print(f"warning: data.skip_corrupt left out {len(loader.skipped_shards)} shard(s): {loader.skipped_shards}",
              file=sys.stderr, flush=True)
    if not valid and rank0:
        print(f"warning: the valid split of {d.valid or d.manifests[0]} is empty: no validation ELBO will be "
              "reported; prepare the data with --valid-fraction > 0 or point data.valid at a dataset with a valid "
              "split", file=sys.stderr, flush=True)
    trainer = Trainer(recipe, layout, topology, loader=loader)
    notes = []
    init_from = recipe.checkpoint.init_from
    if trainer.resume():  # resuming wins over init_from: an SFT run continues like any other run
        notes = [f"resumed from step {trainer.step} ({trainer.checkpoints.latest()})"]
        if init_from:
            notes.append(f"checkpoint.init_from={init_from} is not used: the run resumes its own checkpoint")
        notes += [f"applied from the current recipe: {c.describe()}" for c in (start.changes if start else [])]
        notes += trainer.notes
    elif init_from:
        notes = [load_init_weights(trainer, init_from)]
    if loader.conditional:
        notes.append("prompt/response data: prompts are held clean and never scored; train/loss_per_token and "
                     "valid/elbo_nats_per_token are per response token")
    tokenizer = get_tokenizer(d.tokenizer) if d.tokenizer else None
    counts = parameter_counts(trainer.engine.module.parameters(), tp_rank=ps.get_tensor_model_parallel_rank(),
                              pp_rank=ps.get_pipeline_model_parallel_rank(), dp_rank=dp_rank)
    lines = start_lines(recipe, layout, counts)
    settings = {**to_dict(recipe), "layout": dataclasses.asdict(layout),  # with the world size and grad accum
                "parameters": {"total": counts.total, "per_rank": counts.per_rank}}
    metrics = Metrics(Path(recipe.checkpoint.dir) / "tensorboard", total_steps=recipe.train.steps,
                      start_step=trainer.step, enabled=rank0,
                      wandb=open_wandb(recipe, flatten(settings), trainer.step))
    for line in lines[1:] + notes:  # the layout line was printed when the process groups were built
        metrics.message(line)
    if metrics.wandb is not None:
        metrics.message(metrics.wandb.description)
    metrics.hyperparameters(trainer.step, to_dict(recipe), dataclasses.asdict(layout), lines)
    if notes:
        metrics.text(trainer.step, "resume", "\n\n".join(notes))
    try:
        result = trainer.fit(valid_batches=valid, decode=tokenizer.decode if tokenizer else None, metrics=metrics)
    finally:
        metrics.close()
    if result.stopped_by_signal:  # straight to the exit: the scheduler's grace period is for the checkpoint
        return result
    if trainer.signalled():  # the run is complete; a signal now asks for a prompt exit, not samples
        return result
    texts = trainer.samples(3, steps=recipe.train.sample_steps)
    if rank0 and tokenizer is not None:
        for i, ids in enumerate(texts.tolist()):
            print(f"--- sample {i} ---\n{tokenizer.decode(ids)}", flush=True)
    return result


if __name__ == "__main__":
    sys.exit(main())
