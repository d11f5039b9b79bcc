"""The fused, chunked, vocabulary-parallel score entropy vs the single-process reference and a float64 oracle.

Inputs are on a dyadic grid (hidden in k/4, weight in k/8, bias in k/8) so every logit is exact in float32
whatever the matmul blocking or the vocabulary split: the comparisons then measure the loss, not the GEMM.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from sedd_scale.diffusion import get_graph, to_log_score
from sedd_scale.loss import HeadLossConfig, score_entropy_head, weighted_score_entropy_head
from tests.dist import launch

N = 37  # real tokens; absorb has 38 states
V_PAD = 64  # at TP=4 the last rank holds only padding; at TP=2 rank 1 holds MASK and padding
B, L, H = 6, 7, 24
SIGMAS = (1e-5, 1e-3, 0.1, 1.0, 5.0, 20.0)  # one total noise per sequence
CASES = (("absorb", False), ("absorb", True), ("uniform", False))
RTOL = 1e-6


def make_case(graph: str, seed: int = 0) -> dict:
    """A batch with vocabulary padding, ids in the first and last real columns, and both kinds of x_t."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, N, (B, L), generator=g)
    x0[0, 0], x0[1, 1] = N - 1, 0
    if graph == "absorb":
        xt = torch.where(torch.rand(B, L, generator=g) < 0.6, N, x0)
        xt[:, 2] = N  # every noise level has a masked token
    else:
        xt = torch.where(torch.rand(B, L, generator=g) < 0.5, torch.randint(0, N, (B, L), generator=g), x0)
        xt[:, 2], xt[:, 3] = (x0[:, 2] + 1) % N, x0[:, 3]  # every noise level has both x_t != x_0 and x_t == x_0
        xt[2, 4] = N - 1
    return dict(
        hidden=torch.randint(-8, 9, (B, L, H), generator=g).float() / 4,
        weight=torch.randint(-4, 5, (V_PAD, H), generator=g).float() / 8,
        bias=torch.randint(-8, 9, (V_PAD,), generator=g).float() / 8,
        x_t=xt, x_0=x0, sigma=torch.tensor(SIGMAS), rate=torch.rand(B, generator=g) + 0.5,
    )


def reference(case: dict, graph: str, scale_by_sigma: bool, dtype=torch.float64):
    """Single-process reference: full logits, `to_log_score`, the graph's score entropy; loss and grads."""
    gr = get_graph(graph, N)
    h, w, b = (case[k].to(dtype, copy=True).requires_grad_(True) for k in ("hidden", "weight", "bias"))
    sigma = case["sigma"].to(dtype)
    log_score = to_log_score(h @ w.t() + b, case["x_t"], sigma, num_tokens=N, graph_dim=gr.dim,
                             scale_by_sigma=scale_by_sigma)
    loss = gr.score_entropy(log_score[..., : gr.dim], sigma, case["x_t"], case["x_0"])
    grads = torch.autograd.grad((case["rate"].to(dtype)[:, None] * loss).sum(), (h, w, b))
    return loss.detach(), grads


def oracle_loss(h, w, b, case: dict, graph: str, scale_by_sigma: bool):
    """sedd-math 2.1 written out in float64 (exp-sum / linear-sum form) for float64 head leaves h, w, b."""
    xt, x0 = case["x_t"], case["x_0"]
    e = torch.expm1(case["sigma"].double()[:, None].expand(B, L))
    ls = (h @ w.t() + b)[..., :N]  # real tokens only: no MASK column, no padding
    if scale_by_sigma:
        ls = ls - (torch.log(e) + math.log(N))[..., None]
    l0 = ls.gather(-1, x0[..., None])[..., 0]
    k = lambda a: a * (torch.log(a) - 1)  # noqa: E731
    if graph == "absorb":
        loss = ls.exp().sum(-1) - l0 / e + k(1 / e)
        return torch.where(xt == N, loss, torch.zeros_like(loss))
    not_self = torch.ones_like(ls).scatter_(-1, xt[..., None], 0.0)
    s_exp, s_lin = (ls.exp() * not_self).sum(-1) / N, (ls * not_self).sum(-1) / N
    a = e / (e + N)
    same = s_exp - a * s_lin + (N - 1) / N * k(a)
    moved = s_exp - s_lin - l0 / e + (k(1 / a) - (N - 2)) / N
    return torch.where(xt == x0, same, moved)


def oracle(case: dict, graph: str, scale_by_sigma: bool, upstream=None):
    """Oracle per-token loss and the float64 grads of sum(upstream * loss) (upstream: rate per sequence)."""
    h, w, b = (case[k].to(torch.float64, copy=True).requires_grad_(True) for k in ("hidden", "weight", "bias"))
    loss = oracle_loss(h, w, b, case, graph, scale_by_sigma)
    up = case["rate"].double()[:, None] if upstream is None else upstream
    return loss.detach(), torch.autograd.grad((up * loss).sum(), (h, w, b))


def fused(case: dict, graph: str, scale_by_sigma: bool, *, weighted: bool, chunk_size: int = 5,
          tp: int = 1, rank: int = 0, dtype=torch.float32, group=None, compile: bool = False):
    """This rank's fused loss (per token) and grads (hidden, weight shard, bias shard)."""
    vl = V_PAD // tp
    cfg = HeadLossConfig.for_graph(graph, N, scale_by_sigma, chunk_size, compile=compile)
    h = case["hidden"].to(dtype, copy=True).requires_grad_(True)
    w = case["weight"][rank * vl:(rank + 1) * vl].to(dtype, copy=True).requires_grad_(True)
    b = case["bias"][rank * vl:(rank + 1) * vl].to(dtype, copy=True).requires_grad_(True)
    args = (h, w, b, case["x_t"], case["x_0"], case["sigma"].to(dtype))
    if weighted:
        total, loss = weighted_score_entropy_head(*args, case["rate"].to(dtype), cfg, tp_group=group)
    else:
        loss = score_entropy_head(*args, cfg, tp_group=group)
        total = (case["rate"].to(dtype)[:, None] * loss).sum()
    total.backward()
    return loss.detach(), (h.grad, w.grad, b.grad), total.detach()


def assert_close(actual, expected, rtol=RTOL, what="", floor=1e-6):
    """max |a - e| / (|e| + floor * max|e|) <= rtol: floor 1e-6 is relative per entry (losses are sums of
    non-negative terms); floor 1 is relative to the tensor's largest entry (gradients, whose entries are sums
    of cancelling terms: an entry near zero has no relative precision in any float32 computation)."""
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().clamp(min=1e-300)
    err = ((actual - expected).abs() / (expected.abs() + floor * scale)).max().item()
    assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol:g}"


def check_against(ref, got, rtol, what):
    """Compare (per-token loss, (grad hidden, grad weight, grad bias))."""
    assert_close(got[0], ref[0], rtol, f"{what} loss")
    for name, r, a in zip(("hidden", "weight", "bias"), ref[1], got[1]):
        assert_close(a, r, rtol, f"{what} grad {name}", floor=1.0)


@pytest.mark.parametrize("graph,scale_by_sigma", CASES)
def test_oracle_agrees_with_reference(graph, scale_by_sigma):
    """The two float64 formulations of sedd-math 2.1 (the test's and the reference's) agree."""
    case = make_case(graph)
    check_against(oracle(case, graph, scale_by_sigma), reference(case, graph, scale_by_sigma), 1e-10, "oracle")


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("graph,scale_by_sigma", CASES)
def test_fused_float64_matches_oracle(graph, scale_by_sigma, weighted):
    """In float64 the fused path is the oracle to rounding (chunks of 5 over 42 tokens)."""
    case = make_case(graph, seed=1)
    loss, grads, _ = fused(case, graph, scale_by_sigma, weighted=weighted, dtype=torch.float64)
    check_against(oracle(case, graph, scale_by_sigma), (loss, grads), 1e-11, "fused fp64")


@pytest.mark.parametrize("chunk_size", [1, 5, 4096])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("graph,scale_by_sigma", CASES)
def test_fused_float32_tp1_matches_reference(graph, scale_by_sigma, weighted, chunk_size):
    """float32 fused loss and grads equal the reference, run in float32 and in float64, within rtol 1e-6."""
    case = make_case(graph, seed=2)
    ref = reference(case, graph, scale_by_sigma)
    loss, grads, total = fused(case, graph, scale_by_sigma, weighted=weighted, chunk_size=chunk_size)
    check_against(ref, (loss, grads), RTOL, "fused fp32 vs reference fp64")
    check_against(reference(case, graph, scale_by_sigma, torch.float32), (loss, grads), RTOL,
                  "fused fp32 vs reference fp32")
    assert_close(total, (case["rate"].double()[:, None] * ref[0]).sum(), RTOL, "weighted total")
    assert loss.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    if graph == "absorb":  # unmasked positions have exactly zero loss and hidden-state gradient
        keep = case["x_t"] != N
        assert torch.all(loss[keep] == 0) and torch.all(grads[0][keep] == 0)
    assert torch.all(grads[1][N:] == 0) and torch.all(grads[2][N:] == 0)  # MASK and padding rows


@pytest.mark.slow  # torch.compile of the chunk functions: ~10 s per variant on 2 cores with a cold cache
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("graph,scale_by_sigma", CASES)
def test_compiled_chunks_match_the_oracle_and_eager(graph, scale_by_sigma, weighted):
    """compile=True (model.compile) end to end, and the fused chunk expressions (compiled with inductor on CPU, as on
    CUDA, where the absorbing one runs) against the in-place eager ones, for ordinary and extreme log-scores."""
    from sedd_scale.loss.score_entropy import ABSORB_FUSED, UNIFORM_FUSED, _absorb_terms, _uniform_terms

    for seed, extreme in ((2, False), (5, True)):
        case = make_case(graph, seed=seed)
        if extreme:  # the far branches
            case["bias"][:3] = torch.tensor([70.0, -80.0, 69.0])
            case["weight"] = case["weight"] / 64
        rtol = 1e-5 if extreme else RTOL  # log-scores near 70 carry float32's |l| 2^-24 into e^l
        ref = reference(case, graph, scale_by_sigma)
        check_against(ref, fused(case, graph, scale_by_sigma, weighted=weighted, compile=True)[:2], rtol,
                      f"compile=True vs reference (extreme={extreme})")
        cfg = HeadLossConfig.for_graph(graph, N, scale_by_sigma)
        x_t, x_0 = case["x_t"].reshape(-1), case["x_0"].reshape(-1)
        sigma = case["sigma"][:, None].expand(B, L).reshape(-1)
        tok = cfg.objective.select(x_t, x_0, sigma, 0, N, torch.float32)
        rows = torch.arange(B * L) if tok.rows is None else tok.rows
        z = (case["hidden"].reshape(-1, H)[rows] @ case["weight"][:N].t() + case["bias"][:N])
        scale = torch.rand(len(rows), generator=torch.Generator().manual_seed(seed)) if weighted else None
        if graph == "absorb":
            want = _absorb_terms(z.clone(), tok, scale)
            got = ABSORB_FUSED(True, z, tok.col0, tok.in0, tok.shift, tok.log_r0, tok.r0, scale)
        else:
            want = _uniform_terms(z.clone(), tok, scale)
            got = UNIFORM_FUSED(True, z, tok.col0, tok.in0, tok.colx, tok.inx, tok.log_r, tok.r, tok.log_r0, tok.r0,
                                scale, tok.weight)
        assert_close(got[0], want[0], rtol, f"fused chunk loss (extreme={extreme})")
        if weighted:
            assert_close(got[1], want[1], rtol, f"fused chunk gradient (extreme={extreme})", floor=1.0)
        else:
            assert got[1] is None and want[1] is None


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("graph,scale_by_sigma", CASES)
def test_chunks_sized_by_a_logits_budget_and_uniform_blocks_match_the_oracle(graph, scale_by_sigma, weighted,
                                                                             monkeypatch):
    """chunk_size None: chunks of chunk_bytes of logits (3 tokens here, over several chunks); the uniform terms in
    blocks of 2 rows (a small _BLOCK_BYTES, as GPT-2's vocabulary has on a CPU): float64 equals the oracle."""
    from sedd_scale.loss import score_entropy

    n_local = N  # TP 1: every real token is projected
    cfg = HeadLossConfig.for_graph(graph, N, scale_by_sigma)
    assert cfg.chunk_size is None and cfg.chunk_rows(50257) == 64 * 2**20 // (50257 * 4) == 333
    assert cfg.chunk_rows(50304 // 8) == 2668  # a TP8 shard: 8x the tokens per chunk
    small = dataclasses.replace(cfg, chunk_bytes=3 * n_local * 8)
    assert small.chunk_rows(n_local, 8) == 3 and small.chunk_rows(n_local, 4) == 6
    monkeypatch.setattr(score_entropy, "_BLOCK_BYTES", 2 * n_local * 8)
    for extreme in (False, True):
        case = make_case(graph, seed=4)
        if extreme:  # the far branches, inside blocks
            case["bias"][:3] = torch.tensor([70.0, -80.0, 69.0])
            case["weight"] = case["weight"] / 64
        h, w, b = (case[k].double().requires_grad_(True) for k in ("hidden", "weight", "bias"))
        args = (h, w, b, case["x_t"], case["x_0"], case["sigma"].double())
        if weighted:
            total, loss = weighted_score_entropy_head(*args, case["rate"].double(), small)
        else:
            loss = score_entropy_head(*args, small)
            total = (case["rate"].double()[:, None] * loss).sum()
        total.backward()
        check_against(oracle(case, graph, scale_by_sigma), (loss.detach(), (h.grad, w.grad, b.grad)), 1e-11,
                      f"budgeted chunks, blocks of 2 rows (extreme={extreme})")


def test_grad_output_scales_and_single_backward():
    """Per-token mode honours any upstream gradient; the weighted mode scales by d(total); one backward only."""
    case = make_case("uniform", seed=3)
    cfg = HeadLossConfig.for_graph("uniform", N, chunk_size=7)
    h = case["hidden"].clone().requires_grad_(True)
    w, b = case["weight"].clone().requires_grad_(True), case["bias"].clone().requires_grad_(True)
    up = torch.randn(B, L, dtype=torch.float64)
    loss = score_entropy_head(h, w, b, case["x_t"], case["x_0"], case["sigma"], cfg)
    (loss * up.float()).sum().backward()
    _, ref = oracle(case, "uniform", False, upstream=up)
    for a, r, name in zip((h.grad, w.grad, b.grad), ref, ("hidden", "weight", "bias")):
        assert_close(a, r, RTOL, f"grad {name}", floor=1.0)
    h.grad = w.grad = b.grad = None
    total, _ = weighted_score_entropy_head(h, w, b, case["x_t"], case["x_0"], case["sigma"], case["rate"], cfg)
    (total / 4).backward()
    _, ref = oracle(case, "uniform", False)
    assert_close(w.grad, ref[1] / 4, RTOL, "weighted grad / 4", floor=1.0)
    total, _ = weighted_score_entropy_head(h, w, b, case["x_t"], case["x_0"], case["sigma"], case["rate"], cfg)
    total.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        total.backward()


@pytest.mark.parametrize("graph", ["absorb", "uniform"])
def test_log_scores_up_to_80_do_not_overflow(graph):
    """Log-scores in [-80, 80] (far beyond training values) give finite float32 losses and grads = oracle."""
    case = make_case(graph, seed=5)
    g = torch.Generator().manual_seed(5)
    case["bias"] = torch.randint(-640, 641, (V_PAD,), generator=g) / 8  # on the grid: logits stay exact
    case["bias"][:3] = torch.tensor([79.5, -80.0, 79.0])
    case["weight"] = case["weight"] / 64  # keeps |logit - bias| < 1
    loss, grads, _ = fused(case, graph, False, weighted=False)
    assert torch.isfinite(loss).all() and all(torch.isfinite(t).all() for t in grads)
    assert loss.max() > 1e33  # the e^80 entries are really in there
    check_against(oracle(case, graph, False), (loss, grads), RTOL, "extreme logits")


def test_bfloat16_inputs_accumulate_in_float32():
    """bf16 hidden/head: float32 per-token loss, bf16 grads, close to the float64 reference of the same inputs."""
    case = make_case("uniform", seed=6)  # grid values are exact in bf16
    loss, grads, _ = fused(case, "uniform", False, weighted=False, dtype=torch.bfloat16)
    assert loss.dtype == torch.float32 and all(t.dtype == torch.bfloat16 for t in grads)
    ref = reference(case, "uniform", False)
    # bf16 logits/grad products carry ~2^-8 relative rounding: loose tolerance, but far below any real bug
    check_against(ref, (loss, grads), 3e-2, "bf16")


def test_bad_input_is_rejected_with_a_clear_error():
    """Wrong ids, noise, shapes and configs name the problem."""
    case = make_case("absorb")
    cfg = HeadLossConfig.for_graph("absorb", N)
    args = lambda **o: {**dict(hidden=case["hidden"], weight=case["weight"], bias=case["bias"],  # noqa: E731
                               x_t=case["x_t"], x_0=case["x_0"], total_noise=case["sigma"], cfg=cfg), **o}
    with pytest.raises(ValueError, match="x_0 holds ids"):
        score_entropy_head(**args(x_0=torch.full((B, L), N)))  # MASK is not a clean token
    with pytest.raises(ValueError, match="total_noise must be > 0"):
        score_entropy_head(**args(total_noise=torch.zeros(B)))
    with pytest.raises(ValueError, match="hidden"):
        score_entropy_head(**args(hidden=case["hidden"][:, :3]))
    with pytest.raises(ValueError, match="covers"):
        score_entropy_head(**args(weight=case["weight"][:20], bias=case["bias"][:20]))
    with pytest.raises(ValueError, match="share a dtype"):
        score_entropy_head(**args(weight=case["weight"].double()))
    with pytest.raises(ValueError, match="scale_by_sigma"):
        HeadLossConfig.for_graph("uniform", N, scale_by_sigma=True)
    with pytest.raises(ValueError, match=r"defined for the graphs \['absorb', 'uniform'\], not 'gaussian'"):
        HeadLossConfig.for_graph("gaussian", N)
    with pytest.raises(ValueError, match="chunk_size"):
        HeadLossConfig.for_graph("absorb", N, chunk_size=0)


class _HostSyncs(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ops that make a CUDA device wait for the host: scalar reads (.item(), int(), bool()) and nonzero."""

    def __init__(self):
        super().__init__()
        self.scalar_reads = self.nonzero = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.scalar_reads += 1
        if func.overloadpacket is torch.ops.aten.nonzero:
            self.nonzero += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("graph,scale_by_sigma", CASES)
def test_the_training_path_makes_no_host_sync_but_the_masked_count(graph, scale_by_sigma):
    """With inputs valid by construction (check_inputs=False), forward + backward read no scalar on the host over
    several chunks, including extreme log-scores (the overflow-safe branch); only absorb's compaction (nonzero)
    remains. The checks at data entry do read scalars."""
    case = make_case(graph, seed=8)
    case["bias"][:2] = torch.tensor([70.0, -80.0])  # the far branches are exercised, without a host decision
    case["weight"] = case["weight"] / 64  # keeps every log-score below 80 (on the grid: logits stay exact)
    cfg = HeadLossConfig.for_graph(graph, N, scale_by_sigma, chunk_size=5)
    h = case["hidden"].clone().requires_grad_(True)
    w, b = case["weight"].clone().requires_grad_(True), case["bias"].clone().requires_grad_(True)
    with _HostSyncs() as syncs:
        total, loss = weighted_score_entropy_head(h, w, b, case["x_t"], case["x_0"], case["sigma"], case["rate"], cfg,
                                                  check_inputs=False)
        (total / 3).backward()
    assert (syncs.scalar_reads, syncs.nonzero) == (0, 1 if graph == "absorb" else 0)
    assert torch.isfinite(loss).all() and torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
    ref = oracle(case, graph, scale_by_sigma)
    # Log-scores near 78 carry float32's representation error |l| 2^-24 ~ 5e-6 into e^l (the shift is rounded).
    assert_close(loss, ref[0], 1e-5, "loss")
    assert_close(w.grad, ref[1][1] / 3, 1e-5, "grad weight / 3", floor=1.0)
    with _HostSyncs() as checked:
        score_entropy_head(h, w, b, case["x_t"], case["x_0"], case["sigma"], cfg)
    assert checked.scalar_reads >= 5  # min/max of both id tensors and total_noise > 0


def test_bf16_gemm_operands_accumulate_in_float32():
    """gemm_dtype=bf16 (bf16-mixed): the loss and fp32 gradients are those of the bf16-rounded head inputs computed in
    float64 (products of bf16 numbers are exact; only the fp32 sums round), not those of the fp32 inputs."""
    g = torch.Generator().manual_seed(9)
    case = make_case("absorb", seed=9)
    case["hidden"] = torch.randn(B, L, H, generator=g)  # off the dyadic grid: bf16 rounding is visible
    case["weight"] = torch.randn(V_PAD, H, generator=g) / 4
    rounded = {**case, "hidden": case["hidden"].bfloat16().float(), "weight": case["weight"].bfloat16().float()}
    cfg = HeadLossConfig.for_graph("absorb", N, True, chunk_size=5, gemm_dtype=torch.bfloat16)
    h = case["hidden"].clone().requires_grad_(True)
    w, b = case["weight"].clone().requires_grad_(True), case["bias"].clone().requires_grad_(True)
    total, loss = weighted_score_entropy_head(h, w, b, case["x_t"], case["x_0"], case["sigma"], case["rate"], cfg)
    total.backward()
    assert loss.dtype == h.grad.dtype == w.grad.dtype == b.grad.dtype == torch.float32
    ref = oracle(rounded, "absorb", True)
    assert_close(loss, ref[0], 1e-5, "bf16-operand loss")
    assert_close(b.grad, ref[1][2], 1e-5, "grad bias", floor=1.0)
    # The backward GEMMs round the logit gradient to bf16 as well: 2^-8 relative, far below a wrong formula.
    assert_close(h.grad, ref[1][0], 1e-2, "grad hidden", floor=1.0)
    assert_close(w.grad, ref[1][1], 1e-2, "grad weight", floor=1.0)
    unrounded = oracle(case, "absorb", True)[0]
    assert ((loss.double() - unrounded).abs() / unrounded.clamp(min=1e-30)).max() > 1e-4  # the operands were rounded
    with pytest.raises(ValueError, match="gemm_dtype"):
        HeadLossConfig.for_graph("absorb", N, gemm_dtype=torch.int8)


def _numpy(result):
    """Tensors -> numpy (plain pickles across the process boundary)."""
    loss, grads, total = result
    return loss.numpy(), tuple(g.numpy() for g in grads), total.numpy()


def _megatron_head_check(case, graph, scale_by_sigma):
    """Fused loss through a real ColumnParallelLinear's parameters vs that layer's own forward + reference loss."""
    import sedd_scale.compat  # noqa: F401

    from megatron.core import ModelParallelConfig, parallel_state, tensor_parallel

    rank, tp = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()
    config = ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True,
                                 perform_initialization=False, gradient_accumulation_fusion=False,
                                 params_dtype=torch.float32)
    head = tensor_parallel.ColumnParallelLinear(H, V_PAD, config=config, init_method=torch.nn.init.zeros_,
                                                bias=True, gather_output=False)
    vl = V_PAD // tp
    with torch.no_grad():
        head.weight.copy_(case["weight"][rank * vl:(rank + 1) * vl])
        head.bias.copy_(case["bias"][rank * vl:(rank + 1) * vl])
    gr = get_graph(graph, N)
    cfg = HeadLossConfig.for_graph(graph, N, scale_by_sigma, chunk_size=4)
    out = {}
    for path in ("fused", "megatron"):
        head.zero_grad(set_to_none=True)
        h = case["hidden"].clone().requires_grad_(True)
        if path == "fused":  # default tp_group: megatron's
            loss = score_entropy_head(h, head.weight, head.bias, case["x_t"], case["x_0"], case["sigma"], cfg)
        else:
            local, _ = head(h)
            full = tensor_parallel.gather_from_tensor_model_parallel_region(local)
            log_score = to_log_score(full, case["x_t"], case["sigma"], num_tokens=N, graph_dim=gr.dim,
                                     scale_by_sigma=scale_by_sigma)
            loss = gr.score_entropy(log_score[..., : gr.dim], case["sigma"], case["x_t"], case["x_0"])
        (case["rate"][:, None] * loss).sum().backward()
        out[path] = _numpy((loss.detach(), (h.grad, head.weight.grad, head.bias.grad), loss.detach().sum()))
    return out


def tp_worker(tp: int) -> dict:
    """Every case and mode on this rank (explicit WORLD group), plus the megatron-head check at TP=2."""
    import torch.distributed as dist

    rank, results = dist.get_rank(), {}
    for graph, scale_by_sigma in CASES:
        case = make_case(graph, seed=4)
        for weighted in (False, True):
            results[graph, scale_by_sigma, weighted] = _numpy(
                fused(case, graph, scale_by_sigma, weighted=weighted, tp=tp, rank=rank, group=dist.group.WORLD))
    if tp == 2:
        import sedd_scale.compat  # noqa: F401

        from megatron.core import parallel_state

        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
        for graph, scale_by_sigma in (("absorb", True), ("uniform", False)):
            results["megatron", graph] = _megatron_head_check(make_case(graph, seed=7), graph, scale_by_sigma)
        parallel_state.destroy_model_parallel()
    return results


@pytest.mark.slow
@pytest.mark.megatron
@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_matches_reference(tp):
    """TP = 2, 4 (gloo processes): per-token loss, grad hidden (same on every rank) and the concatenated
    weight/bias shard grads equal the single-process reference within rtol 1e-6, both graphs and modes."""
    per_rank = launch(tp_worker, tp, tp)
    t = lambda a: torch.from_numpy(a)  # noqa: E731
    for graph, scale_by_sigma in CASES:
        case = make_case(graph, seed=4)
        refs = {64: reference(case, graph, scale_by_sigma), 32: reference(case, graph, scale_by_sigma, torch.float32)}
        for weighted in (False, True):
            ranks = [r[graph, scale_by_sigma, weighted] for r in per_rank]
            for r in ranks:  # every rank holds the full loss and hidden-state gradient
                assert_close(t(r[0]), t(ranks[0][0]), 0.0, "loss across ranks")
                assert_close(t(r[1][0]), t(ranks[0][1][0]), 0.0, "grad hidden across ranks", floor=1.0)
            got = (t(ranks[0][0]), (t(ranks[0][1][0]), torch.cat([t(r[1][1]) for r in ranks]),
                                   torch.cat([t(r[1][2]) for r in ranks])))
            for bits, ref in refs.items():
                check_against(ref, got, RTOL, f"TP={tp} {graph} sbs={scale_by_sigma} weighted={weighted} vs fp{bits}")
    if tp == 2:
        for graph in ("absorb", "uniform"):
            ranks = [r["megatron", graph] for r in per_rank]
            for r in ranks:
                fused_r, mega_r = r["fused"], r["megatron"]
                check_against((t(mega_r[0]), tuple(map(t, mega_r[1]))), (t(fused_r[0]), tuple(map(t, fused_r[1]))),
                              RTOL, f"megatron ColumnParallelLinear {graph}")


def test_an_objective_is_chosen_by_name_and_graph_from_the_registry():
    """The fused head takes an objective object; the registry builds it from the recipe's name and the graph, and
    a class registered under a new name runs through the same head (here: score entropy's terms, renamed)."""
    from dataclasses import dataclass

    from sedd_scale.loss import OBJECTIVES, head_objective
    from sedd_scale.loss.objectives import objective
    from sedd_scale.loss.score_entropy import AbsorbScoreEntropy

    assert sorted(OBJECTIVES) == [("masked_ce", "absorb"), ("score_entropy", "absorb"), ("score_entropy", "uniform")]
    with pytest.raises(ValueError, match=r"unknown objective 'mdlm'; choose one of \['masked_ce', 'score_entropy'\]"):
        head_objective("mdlm", "absorb", 8)
    with pytest.raises(ValueError, match=r"'masked_ce' is defined for the graphs \['absorb'\], not 'uniform'"):
        head_objective("masked_ce", "uniform", 8)
    with pytest.raises(ValueError, match="scale_by_sigma is only defined for the absorb graph"):
        head_objective("score_entropy", "uniform", 8, scale_by_sigma=True)

    @objective("renamed_for_the_test", "absorb")
    @dataclass(frozen=True)
    class Renamed(AbsorbScoreEntropy):
        pass

    try:
        with pytest.raises(ValueError, match=r"defined for the graphs \['absorb'\], not 'uniform'"):
            head_objective("renamed_for_the_test", "uniform", N)
        case = make_case("absorb", seed=3)
        args = tuple(case[k] for k in ("hidden", "weight", "bias", "x_t", "x_0", "sigma"))
        base = score_entropy_head(*args, HeadLossConfig.for_graph("absorb", N))
        renamed = score_entropy_head(*args, HeadLossConfig.for_graph("absorb", N, objective="renamed_for_the_test"))
        assert torch.equal(base, renamed)
    finally:
        del OBJECTIVES["renamed_for_the_test", "absorb"]
