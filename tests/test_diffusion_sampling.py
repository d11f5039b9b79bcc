"""Samplers driven by the exact score reproduce enumerable distributions."""
import math

import pytest
import torch

from sedd_scale.diffusion import (
    Infill,
    analytic_step,
    denoise_step,
    euler_step,
    get_graph,
    get_noise,
    sample,
    sample_categorical,
)
from sedd_scale.testing.exact import F64, Enumerated, generator_matrix, random_joint, total_variation

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


# ---------------------------------------------------------------------------------------------
# The fast steps against a plain float64 implementation of the definitions (sedd-math 5)
STEPS_UNDER_TEST = ["euler", "analytic", "denoise"]


def reference_weights(kind, step, log_score, x, t, dt, noise):
    """Step weights (B, L, dim), float64, from the definitions with matrices: Q (exact.generator_matrix) and
    exp(+-ds Q) by torch.linalg.matrix_exp; euler w = onehot(x) + dt sigma(t) R, R_y = s_y Q[x, y] (y != x)."""
    dim = log_score.shape[-1]
    q = generator_matrix(kind, dim - 1 if kind == "absorb" else dim)
    s = log_score.double().exp()
    w = torch.empty_like(s)
    for b in range(x.shape[0]):
        tb = t[b : b + 1].double()
        if step == "euler":
            rate = noise.rate_noise(tb)
            r = s[b] * q[x[b], :]
            r.scatter_(-1, x[b, :, None], 0.0)
            r.scatter_(-1, x[b, :, None], -r.sum(-1, keepdim=True))
            w[b] = float(dt * rate) * r
            w[b].scatter_add_(-1, x[b, :, None], torch.ones(x.shape[1], 1, dtype=F64))
            continue
        total = noise.total_noise(tb)
        ds = float(total - noise.total_noise(tb - dt)) if step == "analytic" else float(total)
        staggered = s[b] @ torch.linalg.matrix_exp(-ds * q).T  # (exp(-ds Q) s)_y = sum_z exp(-ds Q)[y, z] s_z
        w[b] = staggered * torch.linalg.matrix_exp(ds * q)[x[b], :]
        if step == "denoise" and kind == "absorb":
            w[b, :, dim - 1] = 0.0
    return w


def in_sampler_order(weights, x):
    """(weights with the current token moved last, the token ids in that order): the documented u -> token map."""
    dim = weights.shape[-1]
    key = torch.arange(dim) + dim * (torch.arange(dim) == x.reshape(-1, 1))
    order = torch.argsort(key, dim=1)
    return weights.reshape(-1, dim).gather(1, order), order


def reference_draw(weights, x, u):
    """Inverse CDF in float64, written plainly: the first token (x last) whose cumulative max(w, 0) exceeds u total."""
    w, order = in_sampler_order(weights.clamp_min(0.0), x)
    cum = w.cumsum(1)
    k = (cum <= (u * cum[:, -1])[:, None]).sum(1)
    return order.gather(1, k[:, None]).reshape(x.shape)


def step_call(step, fn, graph, noise, x, t, dt, gen):
    if step == "denoise":
        return denoise_step(fn, graph, noise, x, t, gen)
    return {"euler": euler_step, "analytic": analytic_step}[step](fn, graph, noise, x, t, dt, gen)


@pytest.mark.parametrize("kind,noise_kind", [("absorb", "loglinear"), ("uniform", "geometric")])
@pytest.mark.parametrize("step", STEPS_UNDER_TEST)
def test_steps_draw_for_draw_equal_a_float64_reference(kind, noise_kind, step):
    """Same uniforms (the step draws one float64 (B, L) uniform from the generator, whatever the state), same
    tokens as the plain float64 reference at every position, negative weights included; per-sequence t."""
    graph, noise = get_graph(kind, num_tokens=5), get_noise(noise_kind)
    gen = torch.Generator().manual_seed(21)
    batch, length = 6, 400
    # A model's float32 output; per-position offsets give positions that mostly stay, mostly move, or have
    # negative weights (an over-confident model).
    offset = torch.empty(batch, length, 1).uniform_(-7.0, 3.0, generator=gen)
    log_score = (torch.randn(batch, length, graph.dim, generator=gen) * 2 + offset).float()
    x = torch.randint(0, 5, (batch, length), generator=gen)
    if kind == "absorb":
        x = torch.where(torch.rand(batch, length, generator=gen) < 0.6, graph.mask, x)
    t, dt = torch.linspace(0.2, 0.9, batch, dtype=F64), 0.05
    replay = torch.Generator().set_state(gen.get_state())
    got = step_call(step, lambda xx, s: log_score, graph, noise, x, t, dt, gen)
    expected_u = torch.rand(batch * length, dtype=F64, generator=replay)
    assert torch.equal(gen.get_state(), replay.get_state())  # exactly one float64 uniform per position
    weights = reference_weights(kind, step, log_score, x, t, dt, noise)
    want = reference_draw(weights, x, expected_u)
    assert torch.equal(got, want), int((got != want).sum())
    moved = got != x
    assert 0.05 < float(moved.double().mean()) < 0.95  # the case exercises moves and stays
    if not (step == "denoise" and kind == "absorb"):
        assert bool((weights < 0).any()), "the case should exercise negative weights (counted as zero)"
    if kind == "absorb":
        assert bool((got[x != graph.mask] == x[x != graph.mask]).all())
        if step == "denoise":
            assert int(got.max()) < graph.mask


@pytest.mark.parametrize("kind,noise_kind", [("absorb", "loglinear"), ("uniform", "geometric")])
@pytest.mark.parametrize("step", STEPS_UNDER_TEST)
def test_step_frequencies_follow_the_reference_probabilities(kind, noise_kind, step):
    """One position's law, drawn 200,000 times with the real generator: every token within 5 binomial sigmas of
    max(w, 0) / sum from the reference (sum_y of the bounds is the total-variation tolerance)."""
    graph, noise = get_graph(kind, num_tokens=4), get_noise(noise_kind)
    rows = 200_000
    log_score = torch.tensor([1.3, -0.4, 0.2, -2.0, 0.0][: graph.dim]).float()
    x = torch.full((1, rows), graph.mask if kind == "absorb" else 1)
    t, dt = torch.tensor([0.6], dtype=F64), 0.1
    weights = reference_weights(kind, step, log_score.expand(1, 1, -1), x[:, :1], t, dt, noise)[0, 0]
    p = weights.clamp_min(0) / weights.clamp_min(0).sum()
    got = step_call(step, lambda xx, s: log_score.expand(1, rows, -1), graph, noise, x, t, dt,
                    torch.Generator().manual_seed(5))
    freq = torch.bincount(got.reshape(-1), minlength=graph.dim).double() / rows
    bound = 5 * (p * (1 - p) / rows).sqrt() + 1e-12
    assert bool(((freq - p).abs() <= bound).all()), (freq, p)
    assert int((p > 0.02).sum()) >= 3  # a law with several likely outcomes


# ---------------------------------------------------------------------------------------------
# Tail probabilities: a token of relative probability ~1e-9 is drawn at its rate
TAIL_ROWS, WINDOW = 200_000, 1e-6


def float32_inverse_cdf(weights, x, u):
    """The same inverse CDF in float32 (weights, cumulative sum and uniform): what the test must be able to reject."""
    w, order = in_sampler_order(weights.clamp_min(0.0).float(), x)
    cum = w.cumsum(1)
    k = (cum <= (u.float() * cum[:, -1])[:, None]).sum(1).clamp(max=w.shape[1] - 1)
    return order.gather(1, k[:, None]).reshape(x.shape)


def tail_case(case):
    """(draw() -> tokens (1, TAIL_ROWS) at one repeated position, reference weights (dim,), x (1, 1), tail token)."""
    if case == "categorical":
        weights = torch.tensor([0.5, 1e-9, 0.5], dtype=F64)
        # sample_categorical has no current token; x = the last index keeps the order natural
        return lambda: sample_categorical(weights.expand(TAIL_ROWS, -1)).reshape(1, -1), weights, torch.tensor([[2]]), 1
    if case == "absorb-analytic":  # MASK stays with ~1/2; real token 0 has ~1/2, then token 1 ~1e-9
        kind, noise, step, t, dt = "absorb", get_noise("loglinear"), "analytic", 0.5, 0.01
        e = float(torch.expm1(noise.total_noise(torch.tensor(t)) - noise.total_noise(torch.tensor(t - dt))))
        scores, x = [0.5 / e, 1e-9 / e, 1e-3, 1.0], 3  # x = MASK
    else:  # uniform euler: x = 3 stays with ~0.7; token 0 has ~0.3, then token 1 ~1e-9
        kind, noise, step, t, dt = "uniform", get_noise("geometric"), "euler", 0.5, 0.001
        c = dt * float(noise.rate_noise(torch.tensor(t, dtype=F64))) / 4
        scores, x = [0.3 / c, 1e-9 / c, 1e-3, 1.0], 3
    graph, t, x = get_graph(kind, 3 if kind == "absorb" else 4), torch.tensor([t], dtype=F64), torch.tensor([[x]])
    log_score = torch.tensor(scores, dtype=F64).log().float()
    weights = reference_weights(kind, step, log_score.view(1, 1, -1), x, t, dt, noise)[0, 0]
    fn = lambda xx, s: log_score.expand(1, TAIL_ROWS, -1)  # noqa: E731
    return (lambda: step_call(step, fn, graph, noise, x.expand(1, TAIL_ROWS), t, dt, None)), weights, x, 1


@pytest.mark.parametrize("case", ["categorical", "absorb-analytic", "uniform-euler"])
def test_tail_token_of_probability_1e_9_is_drawn_at_its_rate(case, monkeypatch):
    """Conditioning the sampler's uniforms on a window of width 1e-6 around the tail token's interval (in the
    documented u -> token order) multiplies its probability by 1e6: 200,000 draws must show it at
    p / 1e-6 within a binomial bound. A float32 inverse CDF fed the same uniforms fails that bound."""
    from sedd_scale.diffusion import sampling

    real = sampling._uniform((100_000,), torch.Generator().manual_seed(0), "cpu")
    assert real.dtype == F64 and float(((real * 2**24) % 1 != 0).double().mean()) > 0.99  # finer than float32

    draw, weights, x, tail = tail_case(case)
    w, order = in_sampler_order(weights.clamp_min(0).view(1, 1, -1), x)
    cum, total = w[0].cumsum(0), float(w[0].sum())
    k = int((order[0] == tail).nonzero())
    lo, hi = float(cum[k - 1]) / total, float(cum[k]) / total
    p = hi - lo
    assert 0.5e-9 < p < 2e-9 and lo > WINDOW, (p, lo)
    u = (lo + hi) / 2 + WINDOW * (torch.rand(TAIL_ROWS, dtype=F64, generator=torch.Generator().manual_seed(1)) - 0.5)
    monkeypatch.setattr(sampling, "_uniform", lambda shape, generator, device: u.reshape(shape))

    def within_bound(hits: int) -> bool:
        mean = TAIL_ROWS * p / WINDOW
        return abs(hits - mean) <= 5 * math.sqrt(mean)

    hits = int((draw() == tail).sum())
    assert within_bound(hits), (hits, TAIL_ROWS * p / WINDOW)
    f32 = int((float32_inverse_cdf(weights.view(1, 1, -1).expand(1, TAIL_ROWS, -1), x.expand(1, TAIL_ROWS), u)
               == tail).sum())
    assert not within_bound(f32), f32


def test_all_zero_or_non_finite_weights_raise_and_bad_eps_is_refused():
    graph, noise, t = get_graph("absorb", 3), get_noise("loglinear"), torch.tensor([0.5], dtype=F64)
    x = torch.tensor([[3, 3, 1]])
    log_score = torch.zeros(1, 3, 4)
    log_score[0, 1, :3] = float("-inf")  # MASK at position 1 with no real token possible
    with pytest.raises(FloatingPointError, match="all zero or not finite at 1 of 3 positions"):
        denoise_step(lambda *_: log_score, graph, noise, x, t)  # MASK may not be kept
    kept = analytic_step(lambda *_: log_score, graph, noise, x, t, 0.1, torch.Generator().manual_seed(0))
    assert int(kept[0, 1]) == 3 and int(kept[0, 2]) == 1  # a predictor step keeps MASK there
    frozen = log_score.clone()
    frozen[0, 2, 1] = float("-inf")  # the unmasked token's own (only) analytic weight s_x is 0
    with pytest.raises(FloatingPointError, match="at 1 of 3 positions"):
        analytic_step(lambda *_: frozen, graph, noise, x, t, 0.1)
    assert int(euler_step(lambda *_: frozen, graph, noise, x, t, 0.1)[0, 2]) == 1  # euler's weight there is 1
    nan = torch.zeros(1, 3, 4)
    nan[0, 0, 2] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN"):
        euler_step(lambda *_: nan, graph, noise, x, t, 0.1)
    uniform = get_graph("uniform", 4)
    with pytest.raises(FloatingPointError, match="at 1 of 3 positions"):
        analytic_step(lambda *_: nan, uniform, get_noise("geometric"), torch.tensor([[0, 1, 2]]), t, 0.1)
    with pytest.raises(FloatingPointError, match="all zero or not finite"):
        sample_categorical(torch.tensor([[0.5, float("nan")], [1.0, 0.0]]))
    with pytest.raises(ValueError, match="eps must be in"):
        sample(lambda *_: log_score, graph, noise, (1, 3), steps=2, eps=1.0)
