"""Noise schedules and the output parametrisation against float64 definitions."""
import math
from fractions import Fraction

import pytest
import torch

from sedd_scale.diffusion import get_graph, get_noise, to_log_score

F64 = torch.float64


@pytest.mark.parametrize("kind,kwargs,expected", [
    ("loglinear", {}, lambda t: -math.log1p(float(-(1 - Fraction(1e-3)) * Fraction(t)))),  # exact rationals
    ("geometric", {}, lambda t: 1e-4 ** (1 - t) * 20.0 ** t),
    ("geometric", {"sigma_min": 1e-5, "sigma_max": 2.0}, lambda t: 1e-5 ** (1 - t) * 2.0 ** t),
])
def test_total_noise_and_rate_match_definition_and_derivative(kind, kwargs, expected):
    noise = get_noise(kind, **kwargs)
    t = torch.tensor([0.0, 1e-6, 1e-3, 0.25, 0.5, 0.75, 0.999, 1.0], dtype=F64, requires_grad=True)
    total, rate = noise(t)
    torch.testing.assert_close(total.detach(), torch.tensor([expected(v) for v in t.tolist()], dtype=F64),
                               rtol=1e-13, atol=0)
    (deriv,) = torch.autograd.grad(total.sum(), t)
    torch.testing.assert_close(rate.detach(), deriv, rtol=1e-12, atol=0)
    # float32 in, float32 out, accurate to float32 precision even near t = 1 (no 1 - (1 - eps) t
    # cancellation); 2e-6 = geometric exp's condition number |log sigma| <= 12 times float32 epsilon.
    t32 = t.detach().float()
    total32, rate32 = noise(t32)
    total_at_t32, rate_at_t32 = noise(t32.double())  # the same (float32-rounded) times in float64
    assert total32.dtype == rate32.dtype == torch.float32
    torch.testing.assert_close(total32.double(), total_at_t32, rtol=2e-6, atol=0)
    torch.testing.assert_close(rate32.double(), rate_at_t32, rtol=2e-6, atol=0)


def test_loglinear_endpoints():
    noise = get_noise("loglinear", eps=1e-3)
    total, rate = noise(torch.tensor([0.0, 1.0], dtype=F64))
    assert total.tolist() == pytest.approx([0.0, -math.log(1e-3)], rel=1e-14)
    assert rate.tolist() == pytest.approx([0.999, 999.0], rel=1e-12)


def test_to_log_score_matches_the_reference_post_processing():
    """sedd-math 4: out - log(e^sigma - 1) - log N (absorb, scale_by_sigma), then 0 at x."""
    n = 7
    graph = get_graph("absorb", num_tokens=n)
    gen = torch.Generator().manual_seed(0)
    raw = torch.randn(3, 5, graph.dim, dtype=F64, generator=gen)
    x = torch.randint(0, graph.dim, (3, 5), generator=gen)
    sigma = torch.tensor([1e-3, 0.4, 6.9], dtype=F64)
    got = to_log_score(raw, x, sigma, num_tokens=n, graph_dim=graph.dim, scale_by_sigma=True)
    expected = raw - (torch.log(torch.exp(sigma) - 1) + math.log(n))[:, None, None]
    expected.scatter_(-1, x[..., None], 0.0)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    plain = to_log_score(raw, x, sigma, num_tokens=n, graph_dim=graph.dim, scale_by_sigma=False)
    torch.testing.assert_close(plain, raw.scatter(-1, x[..., None], 0.0))


def test_to_log_score_on_vocab_shards_with_padding_equals_the_full_result():
    n, padded, shards = 10, 12, 3
    graph = get_graph("absorb", num_tokens=n)  # dim 11, one padded column
    gen = torch.Generator().manual_seed(1)
    raw = torch.randn(2, 4, padded, generator=gen)
    x = torch.randint(0, graph.dim, (2, 4), generator=gen)
    sigma = torch.tensor([0.2, 3.0])
    full = to_log_score(raw, x, sigma, num_tokens=n, graph_dim=graph.dim, scale_by_sigma=True)
    assert bool(torch.isinf(full[..., graph.dim:]).all()) and bool(torch.isfinite(full[..., : graph.dim]).all())
    width = padded // shards
    parts = [to_log_score(raw[..., r * width:(r + 1) * width], x, sigma, num_tokens=n, graph_dim=graph.dim,
                          scale_by_sigma=True, vocab_start=r * width) for r in range(shards)]
    torch.testing.assert_close(torch.cat(parts, -1), full, rtol=0, atol=0)
    large = to_log_score(torch.zeros(1, 1, graph.dim), x[:1, :1], torch.tensor([50.0]), num_tokens=n,
                         graph_dim=graph.dim, scale_by_sigma=True)
    assert bool(torch.isfinite(large).all())  # log(e^sigma - 1) without overflow


def test_a_schedule_registers_by_name_and_the_recipe_validates_through_it():
    """The registry is the only list of schedules: the recipe names one, the schedule checks its own parameters
    (reported under the recipe's keys), an unknown name lists the registered ones."""
    from sedd_scale.config import DiffusionConfig
    from sedd_scale.diffusion.noise import SCHEDULES, noise_spec

    assert sorted(SCHEDULES) == ["geometric", "loglinear"]
    d = DiffusionConfig(noise="geometric", sigma_min=1e-3, sigma_max=5.0)
    assert d.schedule() == get_noise("geometric", sigma_min=1e-3, sigma_max=5.0)
    assert noise_spec(d.schedule()) == d.noise_spec() and DiffusionConfig.section_for(d.noise_spec())["sigma_max"] == 5
    with pytest.raises(ValueError, match="loglinear noise needs 0 < noise_eps < 1, got noise_eps=2.0"):
        DiffusionConfig(noise="loglinear", noise_eps=2.0)
    with pytest.raises(ValueError, match=r"unknown schedule 'cosine'; choose one of \['geometric', 'loglinear'\]"):
        DiffusionConfig(noise="cosine")


def test_masked_fraction_is_integrated_for_a_schedule_without_a_closed_form():
    """`masked_fraction` uses a schedule's closed form where it has one and integrates its own total_noise
    otherwise: the two agree for log-linear, and geometric matches a float64 midpoint sum of 10^6 points."""
    from sedd_scale.diffusion.noise import masked_fraction

    loglinear = get_noise("loglinear", eps=1e-3)

    class NoClosedForm:  # the same schedule seen only through total_noise
        def total_noise(self, t):
            return loglinear.total_noise(t)

    for t_min in (1e-3, 0.2):
        assert masked_fraction(NoClosedForm(), t_min) == pytest.approx(loglinear.masked_fraction(t_min), abs=1e-12)
    geometric = get_noise("geometric")
    t = 1e-3 + (1 - 1e-3) * (torch.arange(10**6, dtype=F64) + 0.5) / 10**6
    midpoint = float((-torch.expm1(-geometric.total_noise(t))).mean())
    assert masked_fraction(geometric, 1e-3) == pytest.approx(midpoint, abs=1e-9)
