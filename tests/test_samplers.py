"""The registered samplers (sedd_scale/diffusion/samplers/) against exact enumerable distributions and their
documented properties: reuse is exact for a sigma-independent model, confidence/block are exact where their
docstrings say so and biased (by the stated, exactly computed amount) where not, NFE is counted."""
import math

import pytest
import torch

from sedd_scale.diffusion import Infill, get_graph, get_noise, sample, to_log_score
from sedd_scale.diffusion.samplers import SAMPLERS, NFECounter, parse_sampler
from sedd_scale.testing.exact import F64, Enumerated, random_joint, total_variation
from tests.test_diffusion_sampling import SAMPLES, exact_sampling_floor

pytestmark = pytest.mark.usefixtures("one_thread")  # many tiny ops: 2 threads on a busy machine were 50x slower

N, D = 3, 4  # 3 real tokens, 4 positions: 81 sequences
GRAPH, NOISE = get_graph("absorb", N), get_noise("loglinear")
MASK = GRAPH.mask


@pytest.fixture(scope="module")
def enum():
    return Enumerated("absorb", random_joint(N, D, seed=11))


@pytest.fixture(scope="module")
def floor(enum):
    return exact_sampling_floor(enum.p0, seed=0)


def draw(spec, fn, steps, seed, shape=(SAMPLES, D), **kw):
    gen = torch.Generator().manual_seed(seed)
    return parse_sampler(spec)(fn, GRAPH, NOISE, shape, steps=steps, generator=gen, **kw)


def network(sigma_weight: float):
    """A float64 stand-in network with the absorbing scale_by_sigma post-processing: raw output f(x) + w sigma g(x)
    (w = 0: the network ignores sigma, like an MDLM-style time-independent denoiser)."""
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(D * (N + 1), D * (N + 1), dtype=F64, generator=gen), torch.randn(D * (N + 1), dtype=F64,
                                                                                       generator=gen)

    def fn(x, total):
        onehot = torch.nn.functional.one_hot(x, N + 1).to(F64).reshape(x.shape[0], -1)
        raw = (onehot @ a + sigma_weight * total.double()[:, None] * b).reshape(*x.shape, N + 1)
        return to_log_score(raw, x, total.double(), num_tokens=N, graph_dim=N + 1, scale_by_sigma=True)
    return fn


# ---------------------------------------------------------------------------------------------
# Registry
def test_specs_round_trip_and_bad_specs_name_the_fix():
    assert set(SAMPLERS) >= {"analytic", "euler", "cached", "confidence", "block"}
    for spec in ("analytic", "cached:predictor=euler", "confidence:threshold=0.9", "confidence:top_k=2",
                 "block:size=8,inner=confidence,threshold=0.8", "block:size=4,inner=cached,predictor=euler"):
        assert parse_sampler(spec).spec() == spec
    assert parse_sampler("confidence:top-k=3", {"threshold": "0.5"}).options() == {"threshold": 0.5, "top_k": 3}
    for spec, message in [("ddim", r"unknown sampler 'ddim'; choose one of \['analytic', 'block'"),
                          ("analytic:predictor=euler", r"sampler 'analytic' has no option 'predictor'"),
                          ("cached:predictor=heun", r"cached:predictor must be one of \['analytic', 'euler'\]"),
                          ("confidence:threshold=1.5", r"threshold must be in \(0, 1\]"),
                          ("confidence:top_k=x", r"confidence:top_k must be an integer"),
                          ("confidence:threshold", r"is not key=value"),
                          ("block:size=0", r"block:size must be >= 1"),
                          ("block:inner=block", r"cannot be block itself"),
                          ("block:inner=analytic,threshold=0.5", r"sampler 'analytic' has no option 'threshold'")]:
        with pytest.raises(ValueError, match=message):
            parse_sampler(spec)
    for spec in ("confidence", "block:size=2"):
        with pytest.raises(ValueError, match=r"needs the absorb graph, not uniform: pick one of \['analytic', 'ca"):
            parse_sampler(spec)(lambda x, s: x, get_graph("uniform", 3), NOISE, (1, 4), steps=2)


def test_exact_samplers_are_sample_with_an_nfe_count(enum):
    got = draw("euler", enum.log_score_fn(), steps=6, seed=4, shape=(500, D))
    want = sample(enum.log_score_fn(), GRAPH, NOISE, (500, D), steps=6, predictor="euler",
                  generator=torch.Generator().manual_seed(4))
    assert torch.equal(got.tokens, want) and got.nfe == 7 and got.calls == 7  # 6 steps + the denoise


# ---------------------------------------------------------------------------------------------
# (a) Reuse
@pytest.mark.parametrize("predictor", ["analytic", "euler"])
def test_reuse_is_exact_for_a_sigma_independent_model(predictor):
    """The same tokens as the uncached predictor from the same seed, at a fraction of the evaluations; with
    infilling too. A sigma-conditioned network gives different (approximate) samples from as few evaluations."""
    infill = Infill.from_template([None, 1, None, None])
    for fill in (None, infill):
        base = draw(predictor, network(0.0), steps=64, seed=5, shape=(4000, D), infill=fill)
        reused = draw(f"cached:predictor={predictor}", network(0.0), steps=64, seed=5, shape=(4000, D), infill=fill)
        assert torch.equal(reused.tokens, base.tokens)
        # A sequence is evaluated at the first step and after each step that unmasked something: <= 1 + 4 + 1.
        assert base.nfe == 65 and reused.nfe <= 6 and reused.calls == 65, (base.nfe, reused.nfe)
    stale = draw(f"cached:predictor={predictor}", network(0.5), steps=64, seed=5, shape=(4000, D))
    fresh = draw(predictor, network(0.5), steps=64, seed=5, shape=(4000, D))
    assert not torch.equal(stale.tokens, fresh.tokens) and stale.nfe <= 6


def test_reuse_with_exact_scores_reproduces_the_distribution(enum, floor):
    """The exact absorbing scores are sigma-independent up to the rescale, so reuse is exact for them."""
    got = draw("cached", enum.log_score_fn(), steps=128, seed=128)
    tv = total_variation(got.tokens, enum.p0)
    assert got.nfe <= 6 and tv < floor + 0.015, (got.nfe, tv, floor)


# ---------------------------------------------------------------------------------------------
# (b) Confidence
def test_confidence_one_position_per_step_is_exact(enum, floor):
    got = draw("confidence", enum.log_score_fn(), steps=D, seed=6)
    tv = total_variation(got.tokens, enum.p0)
    assert got.nfe == D and tv < floor + 0.015, (got.nfe, tv, floor)
    more = draw("confidence", enum.log_score_fn(), steps=50, seed=6, shape=(100, D))
    assert more.nfe == D  # every sequence is done after D reveals: no further evaluation


def product_of_marginals(p0):
    """The law of drawing every position at once from its marginal (a one-step parallel decode)."""
    out = torch.ones((), dtype=F64)
    for axis in range(p0.dim()):
        marginal = p0.sum(dim=[a for a in range(p0.dim()) if a != axis])
        out = out[..., None] * marginal
    return out


def test_confidence_parallel_reveals_are_biased_by_the_stated_amount(enum, floor):
    """top_k = D reveals everything in one evaluation from the product of marginals: its samples follow that
    law (within the sampling floor) and sit at its exactly computed distance from the truth."""
    got = draw(f"confidence:top_k={D}", enum.log_score_fn(), steps=8, seed=7)
    law = product_of_marginals(enum.p0)
    bias = 0.5 * float((law - enum.p0).abs().sum())
    assert got.nfe == 1 and total_variation(got.tokens, law) < floor + 0.015
    assert abs(total_variation(got.tokens, enum.p0) - bias) < floor + 0.015 and bias > 0.2, bias
    for spec in ("confidence:threshold=0.5", "confidence:threshold=0.9", "confidence:top_k=2"):
        for steps in (1, 2, 3):
            got = draw(spec, enum.log_score_fn(), steps=steps, seed=8, shape=(2000, D))
            assert got.nfe <= steps and int(got.tokens.max()) < MASK, (spec, steps, got.nfe)


def test_confidence_threshold_one_is_exact_and_lower_thresholds_trade_quality_for_nfe(enum, floor):
    """A threshold only adds reveals of positions at least that confident: the higher, the closer to exact."""
    nfe, tv = {}, {}
    for threshold in (1.0, 0.6, 0.3):
        got = draw(f"confidence:threshold={threshold}", enum.log_score_fn(), steps=D, seed=9)
        nfe[threshold], tv[threshold] = got.nfe, total_variation(got.tokens, enum.p0)
    assert nfe[1.0] == D and tv[1.0] < floor + 0.015, (nfe, tv)
    assert nfe[0.3] < nfe[0.6] < D and tv[0.3] > tv[0.6] > tv[1.0], (nfe, tv)


# ---------------------------------------------------------------------------------------------
# (c) Block
@pytest.mark.parametrize("spec,steps", [("block:size=1,inner=confidence", D), ("block:size=2", 128),
                                        ("block:size=2,inner=cached", 128)])
def test_block_decoding_is_as_exact_as_its_inner_sampler(enum, floor, spec, steps):
    got = draw(spec, enum.log_score_fn(), steps=steps, seed=10)
    tv = total_variation(got.tokens, enum.p0)
    assert tv < floor + 0.015, (spec, tv, floor)
    if spec == "block:size=2":
        assert got.nfe == steps + 2  # the budget split over two blocks, plus one denoise each


def test_block_order_later_blocks_are_masked_and_given_tokens_kept(enum):
    """Every network input: blocks before the current one fully decoded, blocks after it all MASK except the
    given tokens, which never change; the current block is the only one that moves."""
    template = [None, None, 2, None, None, None]  # blocks of 2: a token given in the second block
    infill = Infill.from_template(template)
    seen = []

    def fn(x, total):
        seen.append(x.clone())
        return torch.zeros(*x.shape, N + 1, dtype=F64)  # uniform denoiser: every state is reachable
    for spec in ("block:size=2", "block:size=2,inner=confidence", "block:size=2,inner=cached"):
        seen.clear()
        got = draw(spec, fn, steps=6, seed=11, shape=(64, 6), infill=infill)
        assert bool((got.tokens[:, 2] == 2).all()) and int(got.tokens.max()) < MASK
        # The first block with a MASK (the last block once everything is decoded, before its final denoise).
        current = [min(int(((x == MASK).any(0)).nonzero()[0]) // 2, 2) if bool((x == MASK).any()) else 2
                   for x in seen]
        assert current == sorted(current) and set(current) == {0, 1, 2}, (spec, current)
        for x, j in zip(seen, current):
            assert bool((x[:, 2] == 2).all())
            assert bool((x[:, : 2 * j] != MASK).all())
            later = torch.arange(6) >= 2 * (j + 1)
            assert bool((x[:, later & ~infill.positions] == MASK).all()), (spec, j, x[:2])


@pytest.mark.parametrize("spec,steps", [("confidence", D), ("block:size=2,inner=confidence", D),
                                        ("block:size=1", 64), ("cached", 64)])
def test_infilling_samples_the_exact_conditional(spec, steps):
    """Positions 0 and 3 given (absorbing: exact), as in test_diffusion_sampling."""
    p0 = random_joint(N, D, seed=12)
    enum = Enumerated("absorb", p0)
    got = draw(spec, enum.log_score_fn(), steps=steps, seed=13, infill=Infill.from_template([2, None, None, 0]))
    assert bool((got.tokens[:, 0] == 2).all() and (got.tokens[:, 3] == 0).all())
    conditional = p0[2, :, :, 0] / p0[2, :, :, 0].sum()
    tv = total_variation(got.tokens[:, 1:3], conditional)
    assert tv < 0.025, (spec, tv)


def test_nfe_counter_counts_rows():
    counter = NFECounter(lambda x, s: x, batch=4)
    counter(torch.zeros(4, 3), torch.zeros(4))
    counter(torch.zeros(1, 3), torch.zeros(1))
    assert (counter.calls, counter.rows) == (2, 5) and math.isclose(counter.nfe, 1.25)


def test_the_recipe_key_is_checked_on_load():
    from sedd_scale.config.recipe import Recipe
    from sedd_scale.config.typed import from_dict
    from sedd_scale.config.yaml_loader import RecipeError
    from tests.test_config import minimal

    assert from_dict(Recipe, minimal(train={"sampler": "confidence:threshold=0.9"})).train.sampler == \
        "confidence:threshold=0.9"
    for sampler, graph, message in [("ddim", "absorb", r"unknown sampler 'ddim'"),
                                    ("cached:predictor=heun", "absorb", r"predictor must be one of"),
                                    ("block:size=8", "uniform", r"needs the absorb graph, not uniform")]:
        raw = minimal(train={"sampler": sampler})
        raw["model"]["graph"] = graph
        if graph == "uniform":
            raw["model"]["scale_by_sigma"] = False
        with pytest.raises((RecipeError, ValueError), match=message):
            from_dict(Recipe, raw)


def test_the_decode_benchmark_runs_and_its_headline_picks_the_fewest_nfe(capsys):
    """benchmarks/bench_decode.py end to end at a toy size (a smoke run: the numbers are the lead's to time)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_decode.py"
    spec = importlib.util.spec_from_file_location("bench_decode", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--samples", "3000", "--steps", "4", "16", "--samplers", "analytic", "confidence",
                "confidence:top_k=4"])
    out = capsys.readouterr().out
    assert out.count("\n") == 1 + 1 + 6 + 1 and "headline: confidence at " in out and "with 4.00 NFE" in out, out
    rows = [{"sampler": "analytic", "steps": 128, "nfe": 129.0, "tv": 0.010},
            {"sampler": "x", "steps": 8, "nfe": 8.0, "tv": 0.0109},
            {"sampler": "y", "steps": 4, "nfe": 4.0, "tv": 0.02}]
    assert "headline: x at 8 steps reaches TV 0.0109 with 8.00 NFE" in bench.headline(rows)
