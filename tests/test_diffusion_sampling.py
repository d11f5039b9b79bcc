"""Samplers driven by the exact score reproduce enumerable distributions."""
import pytest
import torch

from sedd_scale.diffusion import Infill, get_graph, get_noise, sample, sample_categorical
from sedd_scale.diffusion.exact import F64, Enumerated, random_joint, total_variation

SAMPLES = 20_000
STEPS = (2, 8, 32, 128)
FINAL_BOUND = 0.035  # at 128 steps; i.i.d. draws from the truth itself give TV ~0.02 at this sample size


def exact_sampling_floor(probs, seed):
    """TV of SAMPLES exact i.i.d. draws from the truth: the best any sampler can show."""
    gen = torch.Generator().manual_seed(seed)
    flat = torch.multinomial(probs.reshape(-1), SAMPLES, replacement=True, generator=gen)
    digits = torch.stack([(flat // 3 ** (probs.dim() - 1 - i)) % 3 for i in range(probs.dim())], -1)
    return total_variation(digits, probs)


@pytest.mark.parametrize("kind,noise_kind", [("absorb", "loglinear"), ("uniform", "geometric")])
@pytest.mark.parametrize("predictor", ["euler", "analytic"])
def test_samplers_with_exact_score_reproduce_the_distribution(kind, noise_kind, predictor):
    enum = Enumerated(kind, random_joint(3, 4, seed=11))
    graph, noise = get_graph(kind, num_tokens=3), get_noise(noise_kind)
    tv = {}
    for steps in STEPS:
        x = sample(enum.log_score_fn(), graph, noise, (SAMPLES, 4), steps=steps, predictor=predictor,
                   generator=torch.Generator().manual_seed(steps))
        assert int(x.max()) < 3, "a MASK or out-of-range token survived the final denoising step"
        tv[steps] = total_variation(x, enum.p0)
    floor = exact_sampling_floor(enum.p0, seed=0)
    print(kind, predictor, {k: round(v, 4) for k, v in tv.items()}, "floor", round(floor, 4))
    assert tv[2] > tv[8] > tv[32] > tv[128] - 0.005, tv
    assert tv[128] < FINAL_BOUND and tv[128] < floor + 0.015, (tv, floor)


@pytest.mark.parametrize("kind,noise_kind", [("absorb", "loglinear")])
def test_infilling_reproduces_the_exact_conditional(kind, noise_kind):
    """Clamp positions 0 and 3; the sampled middle must follow p0(x1, x2 | x0, x3). Exact for the
    absorbing graph only: see `Infill` for why clamping is a heuristic under uniform noise."""
    p0 = random_joint(3, 4, seed=12)
    enum = Enumerated(kind, p0)
    graph, noise = get_graph(kind, num_tokens=3), get_noise(noise_kind)
    infill = Infill.from_template([2, None, None, 0])
    x = sample(enum.log_score_fn(), graph, noise, (SAMPLES, 4), steps=64, predictor="analytic", infill=infill,
               generator=torch.Generator().manual_seed(13))
    assert bool((x[:, 0] == 2).all() and (x[:, 3] == 0).all())
    conditional = p0[2, :, :, 0] / p0[2, :, :, 0].sum()
    tv = total_variation(x[:, 1:3], conditional)
    print(kind, "infill TV", round(tv, 4))
    assert tv < 0.025, tv


def test_infill_constructors_and_errors():
    fill = Infill.prefix_suffix(6, prefix=[4, 5], suffix=[9])
    assert fill.positions.tolist() == [True, True, False, False, False, True]
    assert fill(torch.zeros(2, 6, dtype=torch.long)).tolist()[0] == [4, 5, 0, 0, 0, 9]
    with pytest.raises(ValueError, match="exceed the length"):
        Infill.prefix_suffix(2, prefix=[1, 2], suffix=[3])
    with pytest.raises(ValueError, match="unknown predictor"):
        sample(lambda x, s: x, get_graph("absorb", 3), get_noise("loglinear"), (1, 4), steps=2, predictor="ddim")


def test_categorical_draw_frequencies_and_negative_weights():
    weights = torch.tensor([[0.5, -3.0, 1.5, 2.0]] * 400_000)
    counts = torch.bincount(sample_categorical(weights, torch.Generator().manual_seed(0)), minlength=4).double()
    torch.testing.assert_close(counts / counts.sum(), torch.tensor([0.125, 0.0, 0.375, 0.5], dtype=F64),
                               atol=3e-3, rtol=0)
    with pytest.raises(FloatingPointError, match="all zero"):
        sample_categorical(torch.tensor([[0.0, -1.0]]))
