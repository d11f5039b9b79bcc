"""End to end on an enumerable distribution: data tool -> loader -> trainer -> sampler -> TV to the truth."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.dist import launch

pytestmark = [pytest.mark.slow, pytest.mark.megatron]

N, LENGTH, SAMPLES = 2, 6, 20_000
TV_BOUND = 0.05  # i.i.d. draws from the truth itself show TV ~0.015 at this sample size (64 states)


def truth() -> np.ndarray:
    """A fixed random joint over N^LENGTH sequences (correlated: not a product of marginals)."""
    return np.random.default_rng(0).dirichlet(np.full(N**LENGTH, 0.5))


def write_dataset(folder: str) -> str:
    from sedd_scale.data.manifest import TokenizerInfo
    from sedd_scale.data.prepare import write_sequences

    rng = np.random.default_rng(1)
    states = np.array(np.unravel_index(np.arange(N**LENGTH), (N,) * LENGTH)).T

    def draw(count: int) -> np.ndarray:
        return states[rng.choice(N**LENGTH, size=count, p=truth())].astype(np.int64)

    write_sequences(folder, {"train": draw(40_000), "valid": draw(512)}, TokenizerInfo("enumerable", N, 0),
                    seqs_per_sample=64, seqs_per_shard=8192)
    return f"{folder}/manifest.json"


def tv(samples: torch.Tensor) -> float:
    flat = np.ravel_multi_index(samples.numpy().T, (N,) * LENGTH)
    empirical = np.bincount(flat, minlength=N**LENGTH) / len(flat)
    return 0.5 * float(np.abs(empirical - truth()).sum())


def train_and_sample(folder: str) -> dict:
    from megatron.core import parallel_state as ps

    from sedd_scale import engine
    from sedd_scale.config import Recipe, from_dict
    from sedd_scale.data.loader import EvalLoader, LoaderConfig, TokenLoader
    from sedd_scale.trainer import Trainer

    manifest = write_dataset(folder)
    recipe = from_dict(Recipe, {
        "model": {"hidden_size": 64, "n_heads": 4, "n_blocks": 2, "cond_dim": 32, "num_tokens": N, "length": LENGTH,
                  "vocab_multiple": 1, "dropout": 0.0},
        "data": {"manifests": [manifest], "tokenizer": None, "seq_len": LENGTH, "num_workers": 0},
        "optim": {"lr": 3e-3, "warmup": 20, "schedule": "cosine", "min_lr": 3e-4},
        "parallel": {"micro_batch": 128, "global_batch": 128, "zero_stage": 1},
        "train": {"steps": 500, "ema": 0.98, "seed": 0, "save_every": 500, "eval_every": 500, "log_every": 500,
                  "eval_batches": 2},
        "checkpoint": {"dir": f"{folder}/run"},
    })
    layout, topology = engine.setup(recipe)
    loader = TokenLoader(LoaderConfig([manifest], LENGTH, layout.micro_batch, seed=0), ps.get_data_parallel_rank(),
                         layout.dp)
    loader.check_compatible(N, LENGTH)
    trainer = Trainer(recipe, layout, topology, loader=loader)
    untrained = tv(trainer.samples(SAMPLES, steps=64))
    valid = [b.tokens for b, _ in zip(EvalLoader(manifest, "valid", 128), range(2))]
    result = trainer.fit(valid_batches=valid)
    return {"untrained": untrained, "trained": tv(trainer.samples(SAMPLES, steps=64)),
            "first_loss": result.losses[0], "last_loss": float(np.mean(result.losses[-20:])),
            "valid_nats_per_token": result.valid.nats_per_token, "valid_stderr": result.valid.stderr,
            "true_entropy_per_token": float(-(truth() * np.log(truth())).sum() / LENGTH)}


def test_trained_model_samples_the_true_distribution(tmp_path):
    out = launch(train_and_sample, 1, str(tmp_path))[0]
    print(out)
    assert out["trained"] < TV_BOUND, out
    assert out["untrained"] > 5 * out["trained"], out
    assert out["last_loss"] < out["first_loss"], out
    # The validation ELBO bounds the data's entropy from above (up to its own Monte-Carlo error).
    assert out["valid_nats_per_token"] > out["true_entropy_per_token"] - 4 * out["valid_stderr"], out
