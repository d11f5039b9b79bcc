"""sedd_scale.diffusion.evaluation in one process: the stated errors against the spreads they claim to predict."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from sedd_scale.diffusion import get_graph, get_noise, prior_kl
from sedd_scale.diffusion.elbo import noise_draws
from sedd_scale.diffusion.evaluation import batch_generator, evaluate
from tests.test_diffusion_elbo import RATIO_BOUNDS, product_case

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Batch:
    tokens: torch.Tensor
    valid: torch.Tensor
    index: int


def batches_of(x0: torch.Tensor, size: int) -> list[Batch]:
    """EvalLoader-like batches: the last one padded with invalid rows."""
    out = []
    for i, start in enumerate(range(0, x0.shape[0], size)):
        rows = x0[start : start + size]
        valid = torch.ones(size, dtype=torch.bool)
        valid[rows.shape[0]:] = False
        out.append(Batch(torch.cat([rows, rows.new_zeros(size - rows.shape[0], rows.shape[1])]), valid, i))
    return out


def batch_loss(fn, graph):
    """The trainer's eval_loss contract: mean over the batch's rows of rate * sum_i score entropy."""
    def loss(x0, x_t, total, rate):
        return float((rate.double() * graph.score_entropy(fn(x_t, total), total.double(), x_t, x0).sum(-1)).mean())
    return loss


def pair_formula(loss, graph, noise, batches, draws, seed):
    """The old estimator: one antithetic stratified design of all draws per batch, its variance from the spread of
    the antithetic pairs' means (which counts the integrand's variation over t as noise)."""
    nats, variance, tokens = 0.0, 0.0, 0
    for b in batches:
        gen, mask, rows = batch_generator(seed, b.index, "cpu"), b.valid.double(), b.tokens.shape[0]
        nats += float((prior_kl(graph, noise, b.tokens) * mask).sum())
        for piece in noise_draws(noise, rows, draws, generator=gen, antithetic=True):
            means = torch.tensor([loss(b.tokens, graph.sample_transition(b.tokens, t, generator=gen), t.float(),
                                       (w * mask).float()) for t, w in piece], dtype=torch.float64)
            pairs = means.view(-1, 2).mean(1) if len(means) >= 4 else means
            nats, variance = nats + rows * float(means.mean()), variance + rows**2 * float(pairs.var()) / len(pairs)
        tokens += int(mask.sum()) * b.tokens.shape[1]
    return nats / tokens, math.sqrt(variance) / tokens


def rms(values) -> float:
    return math.sqrt(float(np.mean(np.square(values))))


@pytest.mark.parametrize("kind,noise_kind", [("absorb", "loglinear"), ("uniform", "geometric")])
def test_stated_monte_carlo_error_matches_the_seed_to_seed_spread(kind, noise_kind, one_thread):
    """32 sequences of 256 tokens in 4 batches, 40 seeds, antithetic draws (evaluate's default): the stated error
    predicts the spread; the old antithetic-pair formula states ~10x its spread on the uniform graph."""
    fn, draw = product_case(kind, 256)
    graph, noise = get_graph(kind, num_tokens=5), get_noise(noise_kind)
    loss, batches = batch_loss(fn, graph), batches_of(draw(32, data_seed=2), 8)
    new = [evaluate(loss, graph, noise, batches, draws=8, seed=seed) for seed in range(40)]
    old = [pair_formula(loss, graph, noise, batches, 8, 100 + seed) for seed in range(40)]
    ratio = float(np.std([e.nats_per_token for e in new], ddof=1)) / rms([e.stderr for e in new])
    old_ratio = float(np.std([v for v, _ in old], ddof=1)) / rms([s for _, s in old])
    print(kind, "spread/stated", round(ratio, 3), "old formula", round(old_ratio, 3))
    assert RATIO_BOUNDS[0] < ratio < RATIO_BOUNDS[1], ratio
    if kind == "uniform":
        assert old_ratio < RATIO_BOUNDS[0] / 3, old_ratio


@pytest.mark.parametrize("kind,noise_kind", [("absorb", "loglinear"), ("uniform", "geometric")])
def test_stated_data_error_matches_the_spread_over_test_sets(kind, noise_kind, one_thread):
    """40 independent test sets of 60 sequences of 8 tokens (batches of 8, the last one short) drawn from the same
    source: the spread of their nats/token matches the stated data error (which includes the Monte-Carlo part)."""
    fn, draw = product_case(kind, 8)
    graph, noise = get_graph(kind, num_tokens=5), get_noise(noise_kind)
    loss = batch_loss(fn, graph)
    results = [evaluate(loss, graph, noise, batches_of(draw(60, data_seed=10 + s), 8), draws=16, seed=s)
               for s in range(40)]
    assert all(len(r.groups) == 8 and r.num_sequences == 60 for r in results)
    ratio = float(np.std([r.nats_per_token for r in results], ddof=1)) / rms([r.data_stderr for r in results])
    print(kind, "spread/stated data error", round(ratio, 3))
    assert RATIO_BOUNDS[0] < ratio < RATIO_BOUNDS[1], ratio
    assert rms([r.data_stderr for r in results]) > rms([r.stderr for r in results])  # it includes the noise


def test_bad_draws_and_empty_batches_fail_before_any_work():
    calls = []
    graph, noise = get_graph("absorb", 5), get_noise("loglinear")

    def loss(*args):
        calls.append(1)
        return 0.0

    x0 = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="cannot form 3 equal replicates"):
        evaluate(loss, graph, noise, batches_of(x0, 2), draws=8, replicates=3)
    with pytest.raises(ValueError, match="draws must be >= 2"):
        evaluate(loss, graph, noise, batches_of(x0, 2), draws=1)
    with pytest.raises(ValueError, match="empty split"):
        evaluate(loss, graph, noise, [], draws=4)
    empty = Batch(x0, torch.zeros(2, dtype=torch.bool), 0)
    with pytest.raises(ValueError, match="no valid rows"):
        evaluate(loss, graph, noise, [empty], draws=4)
    assert not calls


def empty_splits(tmp: Path) -> str:
    """A manifest whose valid and test splits hold no sequences."""
    from sedd_scale.data.manifest import TokenizerInfo
    from sedd_scale.data.prepare import write_sequences

    splits = {"train": np.zeros((4, 8), dtype=np.int64), "valid": np.zeros((0, 8), dtype=np.int64),
              "test": np.zeros((0, 8), dtype=np.int64)}
    write_sequences(tmp / "empty", splits, TokenizerInfo("synthetic", 11, 10), seqs_per_sample=2, seqs_per_shard=4)
    return str(tmp / "empty" / "manifest.json")


def test_evaluate_tool_refuses_an_empty_split_in_one_line(tmp_path, capsys):
    """tools/evaluate.py: an empty or missing split is one error line and exit code 2, before any process group,
    model or file: an existing tensorboard log is untouched and no --out appears."""
    import importlib.util

    import torch.distributed as dist

    tool = importlib.import_module("sedd_scale.cli.evaluate")
    manifest, out, tb = empty_splits(tmp_path), tmp_path / "result.json", tmp_path / "tb"
    tb.mkdir()
    (tb / "metrics.jsonl").write_text('{"step": 3}\n')
    cases = {None: "holds no sequences in its split 'test'", "valid": "holds no sequences in its split 'valid'",
             "nope": "has no split 'nope'"}
    for split, message in cases.items():
        argv = [str(tmp_path), "--manifest", manifest, "--out", str(out), "--tensorboard", str(tb)]
        assert tool.main(argv + (["--split", split] if split else [])) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and "train (4 sequences)" in err and "--split" in err, err
    assert not out.exists() and not dist.is_initialized()
    assert [p.name for p in tb.iterdir()] == ["metrics.jsonl"] and (tb / "metrics.jsonl").read_text() == '{"step": 3}\n'
