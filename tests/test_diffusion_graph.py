"""Graph closed forms and score entropy against float64 definitions (matrix exponentials, literal sums)."""
import math

import pytest
import torch

from sedd_scale.diffusion import get_graph, get_noise, score_entropy_loss
from sedd_scale.testing.exact import F64, Enumerated, generator_matrix, random_joint, transition_matrix

N = 5
SIGMAS = [1e-5, 1e-3, 0.3, 0.7, 4.0, 20.0]


def all_tokens(graph):
    return torch.arange(graph.dim)


@pytest.mark.parametrize("kind", ["absorb", "uniform"])
def test_rates_and_transitions_match_matrix_exponential(kind):
    graph = get_graph(kind, num_tokens=N)
    q = generator_matrix(kind, N)
    x = all_tokens(graph)
    with torch.autocast("cpu", enabled=False):
        torch.testing.assert_close(graph.rate(x).double(), q[:, x].T, rtol=0, atol=1e-7)
        torch.testing.assert_close(graph.transp_rate(x).double(), q[x, :], rtol=0, atol=1e-7)
    for sigma in SIGMAS:
        p = transition_matrix(kind, N, sigma)
        s = torch.tensor(sigma, dtype=F64)
        torch.testing.assert_close(graph.transition(x, s), p[:, x].T, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(graph.transp_transition(x, s), p[x, :], rtol=1e-12, atol=1e-15)
        score = torch.rand(3, graph.dim, dtype=F64) * 3
        expected = (torch.linalg.matrix_exp(-sigma * q) @ score.T).T
        got = graph.staggered_score(score, s)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10 * float(expected.abs().max()))


@pytest.mark.parametrize("kind", ["absorb", "uniform"])
def test_sample_transition_and_limit_frequencies(kind):
    graph = get_graph(kind, num_tokens=N)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000,), 2)
    sigma = 0.7
    xt = graph.sample_transition(x0, torch.tensor(sigma), generator=gen)
    freq = torch.bincount(xt, minlength=graph.dim).double() / x0.numel()
    expected = transition_matrix(kind, N, sigma)[:, 2]
    assert (freq - expected).abs().max() < 5e-3, (freq, expected)
    limit = graph.sample_limit(10_000, generator=gen)
    if kind == "absorb":
        assert bool((limit == N).all())
    else:
        assert (torch.bincount(limit, minlength=N).double() / 1e4 - 1 / N).abs().max() < 0.02


@pytest.mark.parametrize("kind", ["absorb", "uniform"])
def test_reverse_rate_from_definition(kind):
    graph = get_graph(kind, num_tokens=N)
    q = generator_matrix(kind, N)
    x = all_tokens(graph)
    score = torch.rand(graph.dim, graph.dim, dtype=F64) + 0.1
    got = graph.reverse_rate(x, score)
    for i, xi in enumerate(x.tolist()):
        expected = score[i] * q[xi, :]
        expected[xi] = 0
        expected[xi] = -expected.sum()
        torch.testing.assert_close(got[i], expected)


def literal_score_entropy(kind, log_score, sigma, x_t, x_0):
    """sum_{y != x_t} Q[x_t, y] (s_y - r_y log s_y + K(r_y)), r_y = p(y|x0)/p(x_t|x0), in float64."""
    n = N if kind == "uniform" else log_score.shape[-1] - 1
    q = generator_matrix(kind, n)
    p = transition_matrix(kind, n, sigma)
    out = torch.zeros(x_t.shape, dtype=F64)
    for idx in torch.cartesian_prod(*[torch.arange(k) for k in x_t.shape]):
        idx = tuple(idx.tolist())
        xt, x0 = int(x_t[idx]), int(x_0[idx])
        total = 0.0
        for y in range(log_score.shape[-1]):
            if y == xt or q[xt, y] == 0:
                continue
            r = float(p[y, x0] / p[xt, x0])
            ly = float(log_score[idx + (y,)])
            k = r * (math.log(r) - 1) if r > 0 else 0.0
            total += float(q[xt, y]) * (math.exp(ly) - r * ly + k)
        out[idx] = total
    return out


@pytest.mark.parametrize("kind", ["absorb", "uniform"])
@pytest.mark.parametrize("sigma", SIGMAS)
def test_score_entropy_matches_literal_definition(kind, sigma):
    graph = get_graph(kind, num_tokens=N)
    gen = torch.Generator().manual_seed(1)
    x_0 = torch.randint(0, N, (3, 6), generator=gen)
    x_t = graph.sample_transition(x_0, torch.tensor(0.8), generator=gen)
    x_t[0, :2] = x_0[0, :2]  # make sure both x_t == x_0 and x_t != x_0 occur
    if kind == "absorb":
        x_t[1, :3] = N
    else:
        x_t[1, :3] = (x_0[1, :3] + 1) % N
    log_score = torch.randn(3, 6, graph.dim, dtype=F64, generator=gen) * 2
    got = graph.score_entropy(log_score, torch.full((3,), sigma, dtype=F64), x_t, x_0)
    expected = literal_score_entropy(kind, log_score, sigma, x_t, x_0)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    assert bool((got >= 0).all())


@pytest.mark.parametrize("kind,noise", [("absorb", "loglinear"), ("uniform", "geometric")])
@pytest.mark.parametrize("sigma", [0.05, 0.5, 3.0])
def test_expected_denoising_score_entropy_is_minimised_at_exact_score(kind, noise, sigma):
    """E_{x0, x_t}[sum_i score_entropy] as a function of the log-score table: zero gradient and a
    minimum at the exact concrete score of p_t (Thm 3.4: DSE = SE + const)."""
    graph = get_graph(kind, num_tokens=3)
    enum = Enumerated(kind, random_joint(3, 4, seed=2))
    states = enum.states
    exact = enum.log_score(states, sigma)
    # Only entries that the loss reads are free parameters: y != x_t (and, absorbing, x_t = MASK, y != MASK).
    table = exact.clone().requires_grad_(True)

    def expected_dse(tab):
        total = torch.zeros((), dtype=F64)
        for x0, p in zip(enum.clean, enum.p0.reshape(-1)):
            weights = enum.conditional(x0, sigma)
            se = graph.score_entropy(tab, torch.tensor(sigma, dtype=F64), states, x0.expand_as(states))
            total = total + p * (weights * se.sum(-1)).sum()
        return total

    value = expected_dse(table)
    (grad,) = torch.autograd.grad(value, table)
    assert float(grad.abs().max()) < 1e-12, float(grad.abs().max())
    gen = torch.Generator().manual_seed(3)
    for scale in (1e-3, 1e-1):
        perturbed = exact + scale * torch.randn(exact.shape, dtype=F64, generator=gen)
        assert float(expected_dse(perturbed)) > float(value.detach())


def literal_sums_score_entropy(kind, log_score, sigma, x_t, x_0, n):
    """sedd-math 2.1's sums form in float64 (an independent formula from the library's Bregman form)."""
    ls = log_score.double()
    sigma = torch.as_tensor(sigma, dtype=F64).reshape(-1, 1)
    e = torch.expm1(sigma)
    if kind == "absorb":
        l0 = ls.gather(-1, x_0[..., None]).squeeze(-1)
        val = ls[..., :n].exp().sum(-1) - l0 / e + (1 / e) * (torch.log(1 / e) - 1)
        return torch.where(x_t == n, val, torch.zeros_like(val))
    a = e / (e + n)
    lx = ls.gather(-1, x_t[..., None]).squeeze(-1)
    l0 = ls.gather(-1, x_0[..., None]).squeeze(-1)
    s_exp = (ls.exp().sum(-1) - lx.exp()) / n
    s_lin = (ls.sum(-1) - lx) / n
    kf = lambda r: r * (torch.log(r) - 1)  # noqa: E731
    same = s_exp - a * s_lin + (n - 1) / n * kf(a)
    diff = s_exp - s_lin - l0 / e + (kf(1 / a) + (n - 2) * -1.0) / n
    return torch.where(x_t == x_0, same, diff)


@pytest.mark.parametrize("kind,noise_kind", [("absorb", "loglinear"), ("uniform", "geometric")])
def test_float32_matches_float64_at_gpt2_vocab(kind, noise_kind):
    """N = 50257, total noise 1e-5 .. 20: float32 score entropy and loss within rtol 1e-5 of float64."""
    n = 50257
    graph = get_graph(kind, num_tokens=n)
    gen = torch.Generator().manual_seed(4)
    sigmas = torch.tensor([1e-5, 1e-4, 1e-3, 1e-2, 0.1, 0.5, 1.0, 4.0, 10.0, 20.0], dtype=F64)
    b, length = sigmas.numel(), 4
    x_0 = torch.randint(0, n, (b, length), generator=gen)
    x_t = x_0.clone()
    if kind == "absorb":
        x_t[:, 1:] = n
    else:
        x_t[:, 2:] = torch.randint(0, n, (b, 2), generator=gen)
    log_score = (torch.randn(b, length, graph.dim, generator=gen, dtype=F64) - 10.0)
    log_score.scatter_(-1, x_t[..., None], 0.0)
    expected = literal_sums_score_entropy(kind, log_score, sigmas, x_t, x_0, n)
    got32 = graph.score_entropy(log_score.float(), sigmas.float(), x_t, x_0)
    got64 = graph.score_entropy(log_score, sigmas, x_t, x_0)
    torch.testing.assert_close(got64, expected, rtol=1e-10, atol=0)
    torch.testing.assert_close(got32.double(), expected, rtol=1e-5, atol=0)

    # The loss (rate-weighted, summed over positions) through the public training-loss entry point.
    noise = get_noise(noise_kind)
    t = torch.tensor([1e-3, 0.2, 0.5, 0.9, 1.0], dtype=F64)
    x0 = x_0[:5]
    fixed = log_score[:5]
    results = {}
    for dtype in (torch.float32, torch.float64):
        g = torch.Generator().manual_seed(5)
        out = score_entropy_loss(lambda x, s: fixed.to(dtype).scatter(-1, x[..., None], 0.0), graph, noise, x0,
                                 t=t.to(dtype), generator=g)
        results[dtype] = out.per_sequence
    torch.testing.assert_close(results[torch.float32].double(), results[torch.float64], rtol=1e-5, atol=0)


def test_reference_cancellation_bug_is_not_reproduced():
    """sedd-math 9.1: a = 1 - N/(E+N) in float32 is stuck at 2^-24 for small sigma; ours is exact."""
    n = 50257
    graph = get_graph("uniform", num_tokens=n)
    x = torch.tensor([[7]])
    log_score = torch.zeros(1, 1, n)
    sigma = torch.tensor([1e-4])
    got = graph.score_entropy(log_score, sigma, x, x)
    expected = literal_sums_score_entropy("uniform", log_score.double(), sigma.double(), x, x, n)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=0)


def test_bad_input_is_refused_with_clear_errors():
    graph = get_graph("absorb", num_tokens=N)
    ls = torch.zeros(2, 3, graph.dim)
    x = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="do not match tokens"):
        graph.score_entropy(torch.zeros(2, 3, graph.dim + 2), torch.ones(2), x, x)
    with pytest.raises(ValueError, match=r"x_t holds token ids in \[99, 99\] but this Absorbing graph allows \[0, 6\)"):
        graph.score_entropy(ls, torch.ones(2), x.clone().fill_(99), x)
    with pytest.raises(ValueError, match="x_0 holds token ids"):
        graph.score_entropy(ls, torch.ones(2), x, x.clone().fill_(N))  # MASK is not a clean token
    with pytest.raises(TypeError, match="integer token tensor"):
        graph.score_entropy(ls, torch.ones(2), x.float(), x)
    with pytest.raises(ValueError, match="does not broadcast"):
        graph.score_entropy(ls, torch.ones(5), x, x)
    with pytest.raises(ValueError, match="unknown graph type"):
        get_graph("gaussian", num_tokens=3)
    with pytest.raises(ValueError, match="unknown noise type"):
        get_noise("cosine")
    with pytest.raises(ValueError, match="0 < eps < 1"):
        get_noise("loglinear", eps=0.0)
