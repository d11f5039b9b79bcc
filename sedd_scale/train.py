"""Training entry point, started by launcher.sh on every rank: `python -m sedd_scale.train RECIPE [--set k=v ...]`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sedd_scale.config import RecipeError, add_recipe_args, load_recipe, overrides_from_args

DEFAULT_RECIPE = "recipes/cpu-tiny.yaml"


def main(argv: list[str] | None = None) -> int:
    """Load and validate the recipe, build the process groups, print the layout, then train."""
    parser = argparse.ArgumentParser(description=__doc__)
    add_recipe_args(parser, default=DEFAULT_RECIPE)
    parser.add_argument("--layout-only", action="store_true",
                        help="build the process groups, print each rank's place in the layout and exit "
                             "(a cheap check of an allocation before a long job)")
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, overrides_from_args(args))
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from sedd_scale import engine  # heavy imports (megatron, deepspeed) only once the recipe is valid

    try:
        layout, topology = engine.setup(recipe)
    except RecipeError as e:  # the launched world size does not fit the recipe
        print(f"error: {e}", file=sys.stderr)
        return 2
    import torch.distributed as dist

    if dist.get_rank() == 0:
        print(f"layout: {layout.describe()}", flush=True)
    print(engine.describe_rank(), flush=True)
    if args.layout_only:
        dist.barrier()
        dist.destroy_process_group()
        return 0
    result = run(recipe, layout, topology)
    dist.barrier()
    dist.destroy_process_group()
    return 0 if not result.stopped_by_signal else 143  # 128 + SIGTERM: schedulers requeue such jobs


def prepare_missing_data(recipe) -> None:
    """Rank 0 prepares `data.prepare` (a built-in corpus) into manifests[0] when that is missing."""
    import torch.distributed as dist

    manifest = Path(recipe.data.manifests[0])
    if dist.get_rank() == 0 and not manifest.exists():
        if not recipe.data.prepare:
            raise FileNotFoundError(f"{manifest} does not exist: run tools/prepare_data.py, or set data.prepare "
                                    "to a built-in corpus (ptb, bible, wiki)")
        from sedd_scale.data.corpora import load_corpus
        from sedd_scale.data.prepare import PrepareConfig, prepare

        print(f"preparing {recipe.data.prepare} ({recipe.data.tokenizer} tokens, length {recipe.data.seq_len}) "
              f"into {manifest.parent}", flush=True)
        config = PrepareConfig(out=manifest.parent, tokenizer=recipe.data.tokenizer, seq_len=recipe.data.seq_len)
        prepare(load_corpus(recipe.data.prepare), config, {"corpus": recipe.data.prepare})
    dist.barrier()


def run(recipe, layout, topology):
    """Data, trainer, resume, train, and a final report (validation bound, samples) on rank 0."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from sedd_scale.data.loader import EvalLoader, LoaderConfig, TokenLoader
    from sedd_scale.data.tokenizer import get_tokenizer
    from sedd_scale.metrics import Metrics
    from sedd_scale.trainer import Trainer

    prepare_missing_data(recipe)
    d, dp_rank = recipe.data, ps.get_data_parallel_rank()
    loader = TokenLoader(LoaderConfig(manifests=list(d.manifests), seq_len=d.seq_len, micro_batch=layout.micro_batch,
                                      weights=d.weights, seed=recipe.train.seed, num_workers=d.num_workers,
                                      global_batch=layout.global_batch),
                         dp_rank, layout.dp)
    loader.check_compatible(recipe.model.num_tokens, d.seq_len)
    evaluation = EvalLoader(d.valid or d.manifests[0], "valid", layout.micro_batch, dp_rank, layout.dp)
    evaluation.check_compatible(recipe.model.num_tokens, d.seq_len)
    valid = [b for b, _ in zip(evaluation, range(recipe.train.eval_batches))]
    trainer = Trainer(recipe, layout, topology, loader=loader)
    rank0 = dist.get_rank() == 0
    if trainer.resume() and rank0:
        print(f"resumed from step {trainer.step} ({trainer.checkpoints.latest()})", flush=True)
    tokenizer = get_tokenizer(d.tokenizer) if d.tokenizer else None
    metrics = Metrics(Path(recipe.checkpoint.dir) / "tensorboard", total_steps=recipe.train.steps,
                      start_step=trainer.step, enabled=rank0)
    try:
        result = trainer.fit(valid_batches=valid, decode=tokenizer.decode if tokenizer else None, metrics=metrics)
    finally:
        metrics.close()
    if rank0 and result.valid is not None:
        v = result.valid
        print(f"step {trainer.step}: validation ELBO {v.nats_per_token:.4f} +- {v.stderr:.4f} nats/token, "
              f"perplexity <= {v.perplexity_bound:.2f} ({v.num_sequences} sequences, EMA weights)", flush=True)
    texts = trainer.samples(3, steps=recipe.train.sample_steps)
    if rank0 and tokenizer is not None:
        for i, ids in enumerate(texts.tolist()):
            print(f"--- sample {i} ---\n{tokenizer.decode(ids)}", flush=True)
    return result


if __name__ == "__main__":
    sys.exit(main())
