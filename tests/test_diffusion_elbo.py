"""The ELBO against exact log-likelihoods of enumerable distributions."""
import math

import numpy as np
import pytest
import torch

from sedd_scale.diffusion import elbo, elbo_per_sequence, get_graph, get_noise, prior_kl
from sedd_scale.diffusion.exact import F64, Enumerated, random_joint

CASES = [("absorb", "loglinear"), ("absorb", "geometric"), ("uniform", "geometric"), ("uniform", "loglinear")]
PANELS = [0.0, 1e-5, 1e-4, 1e-3, 1e-2, 0.05, 0.2, 0.5, 1.0, 2.0, 4.0, 8.0, 14.0, 20.0]


def dwdse_integrand(enum, graph, x0, sigma):
    """f(sigma_bar) = E_{x_t ~ p_t|0(.|x0)} sum_i score_entropy, by enumerating every x_t."""
    states = enum.states
    se = graph.score_entropy(enum.log_score(states, sigma), torch.tensor(sigma, dtype=F64), states,
                             x0.expand_as(states))
    return float((enum.conditional(x0, sigma) * se.sum(-1)).sum())


def dwdse_integral(enum, graph, x0, upper, nodes=24):
    """integral_0^upper f(sigma_bar) d sigma_bar, composite Gauss-Legendre (d sigma_bar = sigma(t) dt)."""
    edges = [e for e in PANELS if e < upper] + [upper]
    xs, ws = np.polynomial.legendre.leggauss(nodes)
    total = 0.0
    for a, b in zip(edges[:-1], edges[1:]):
        for x, w in zip(xs, ws):
            total += 0.5 * (b - a) * w * dwdse_integrand(enum, graph, x0, 0.5 * (b - a) * x + 0.5 * (b + a))
    return total


def kl_to_true_marginal(enum, x0, sigma1):
    q = enum.conditional(x0, sigma1)
    p = enum.marginal(sigma1).reshape(-1)
    keep = q > 0
    return float((q[keep] * (q[keep] / p[keep]).log()).sum())


@pytest.mark.parametrize("kind,noise_kind", CASES)
@pytest.mark.parametrize("product", [False, True])
def test_elbo_with_exact_score_equals_exact_nll(kind, noise_kind, product):
    """With the exact concrete score and the true p_1 as base, the bound is tight: it must equal
    -log p0(x0) up to quadrature error, for every x0 tried."""
    enum = Enumerated(kind, random_joint(3, 4, seed=7, product=product))
    graph = get_graph(kind, num_tokens=3)
    noise = get_noise(noise_kind)
    sigma1 = float(noise.total_noise(torch.tensor(1.0, dtype=F64)))
    for x0 in enum.clean[[0, 17, 40, 80]]:
        nll = -math.log(float(enum.p0[tuple(x0)]))
        bound = dwdse_integral(enum, graph, x0, sigma1) + kl_to_true_marginal(enum, x0, sigma1)
        assert abs(bound - nll) < 1e-6 * max(1.0, nll), (x0.tolist(), bound, nll)


@pytest.mark.parametrize("kind,noise", [("absorb", get_noise("loglinear")), ("absorb", get_noise("loglinear", eps=0.2)),
                                        ("uniform", get_noise("geometric", sigma_max=2.0))])
def test_prior_kl_matches_enumeration_of_the_documented_base(kind, noise):
    """(Schedules ending at small noise, so that the KL is far above float64 rounding.)"""
    enum = Enumerated(kind, random_joint(3, 4, seed=8))
    graph = get_graph(kind, num_tokens=3)
    sigma1 = float(noise.total_noise(torch.tensor(1.0, dtype=F64)))
    if kind == "absorb":
        lam = math.exp(-sigma1)
        base_token = torch.tensor([lam / 3] * 3 + [1 - lam], dtype=F64)
    else:
        base_token = torch.full((3,), 1 / 3, dtype=F64)
    base = base_token[enum.states].prod(-1)
    x0 = enum.clean[[5, 33]]
    expected = []
    for row in x0:
        q = enum.conditional(row, sigma1)
        keep = q > 0
        expected.append(float((q[keep] * (q[keep] / base[keep]).log()).sum()))
    torch.testing.assert_close(prior_kl(graph, noise, x0), torch.tensor(expected, dtype=F64), rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("kind,noise_kind", [("absorb", "loglinear"), ("uniform", "geometric")])
def test_monte_carlo_elbo_is_unbiased_with_honest_standard_error(kind, noise_kind):
    """The library's stratified MC estimate (including its [0, sigma_bar(0)] piece) agrees with the
    quadrature within 4 of its own standard errors, and its standard error is not vacuous."""
    enum = Enumerated(kind, random_joint(3, 4, seed=9))
    graph = get_graph(kind, num_tokens=3)
    noise = get_noise(noise_kind)
    sigma1 = float(noise.total_noise(torch.tensor(1.0, dtype=F64)))
    x0 = enum.clean[23]
    expected = dwdse_integral(enum, graph, x0, sigma1, nodes=16)
    batch = x0.expand(192, -1).contiguous()
    gen = torch.Generator().manual_seed(10)
    bound, var = elbo_per_sequence(enum.log_score_fn(), graph, noise, batch, num_samples=8, generator=gen)
    estimate = float((bound - prior_kl(graph, noise, batch)).mean())
    stderr = math.sqrt(float(var.sum())) / batch.shape[0]
    assert 0 < stderr < 0.1 * expected  # uniform+geometric has a heavy-tailed integrand (sedd-math 9.9)
    assert abs(estimate - expected) < 4 * stderr, (estimate, expected, stderr)

    result = elbo(enum.log_score_fn(), graph, noise, batch[:32], num_samples=4, generator=gen)
    assert result.num_tokens == 32 * 4 and result.num_sequences == 32
    assert result.perplexity_bound == pytest.approx(math.exp(result.nats_per_token))
    merged = result.merge(result)
    assert merged.nats_per_token == pytest.approx(result.nats_per_token)
    assert merged.stderr == pytest.approx(result.stderr / math.sqrt(2))
