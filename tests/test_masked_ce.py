"""The masked cross-entropy objective (MDLM's SUBS) fused with the vocabulary-parallel head, and the denoiser
parametrization: against a float64 oracle of r0 * CE, score entropy of the converted ratios, exact enumeration, and
TP = 2 against TP = 1."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from sedd_scale.config import RecipeError, load_recipe
from sedd_scale.diffusion import elbo_per_sequence, get_graph, get_noise, prior_kl, to_log_score
from sedd_scale.diffusion.parametrization import log_expm1
from sedd_scale.loss import HeadLossConfig, score_entropy_head, weighted_score_entropy_head
from sedd_scale.testing.exact import F64, Enumerated, random_joint, transition_matrix
from tests.dist import launch
from tests.test_vocab_parallel_loss import RTOL, V_PAD, B, H, L, N, assert_close, check_against, make_case

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: thread start-up costs more than it saves


def oracle_loss(h, w, b, case):
    """r0 * (logsumexp over the N real tokens - z_x0) at masked positions, 0 elsewhere (float64 leaves)."""
    z = h @ w.t() + (0 if b is None else b)
    z = z[..., :N]  # SUBS: MASK and padding get no mass
    ce = torch.logsumexp(z, -1) - z.gather(-1, case["x_0"][..., None])[..., 0]
    r0 = 1.0 / torch.expm1(case["sigma"].double())[:, None]
    return torch.where(case["x_t"] == N, r0 * ce, torch.zeros_like(ce))


def oracle(case, bias: bool):
    """Per-token loss and float64 grads (hidden, weight, bias) of sum(rate * loss)."""
    h, w, b = (case[k].to(F64, copy=True).requires_grad_(True) for k in ("hidden", "weight", "bias"))
    loss = oracle_loss(h, w, b if bias else None, case)
    grads = torch.autograd.grad((case["rate"].double()[:, None] * loss).sum(), (h, w, b) if bias else (h, w))
    return loss.detach(), grads


def fused(case, *, weighted: bool, bias: bool = True, chunk_size: int | None = 5, tp: int = 1, rank: int = 0,
          dtype=torch.float32, group=None):
    """This rank's fused masked_ce per-token loss and grads (hidden, weight shard[, bias shard]); chunk_size None:
    chunks of 5 tokens by the logits budget (sized by the shard's rows, so the same on every rank)."""
    vl = V_PAD // tp
    cfg = HeadLossConfig.for_graph("absorb", N, chunk_size=chunk_size, objective="masked_ce")
    if chunk_size is None:
        cfg = dataclasses.replace(cfg, chunk_bytes=5 * vl * torch.finfo(dtype).bits // 8)
    h = case["hidden"].to(dtype, copy=True).requires_grad_(True)
    w = case["weight"][rank * vl:(rank + 1) * vl].to(dtype, copy=True).requires_grad_(True)
    b = case["bias"][rank * vl:(rank + 1) * vl].to(dtype, copy=True).requires_grad_(True) if bias else None
    args = (h, w, b, case["x_t"], case["x_0"], case["sigma"].to(dtype))
    if weighted:
        total, loss = weighted_score_entropy_head(*args, case["rate"].to(dtype), cfg, tp_group=group)
    else:
        loss = score_entropy_head(*args, cfg, tp_group=group)
        total = (case["rate"].to(dtype)[:, None] * loss).sum()
    total.backward()
    return loss.detach(), (h.grad, w.grad) + ((b.grad,) if bias else ())


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("weighted", [False, True])
def test_fused_masked_ce_matches_the_float64_oracle(weighted, bias):
    """Chunks of 5 over the masked tokens: float64 to rounding, float32 within the score-entropy tests' rtol; unmasked
    positions and the MASK / padding rows get exactly zero."""
    case = make_case("absorb", seed=11)
    ref = oracle(case, bias)
    check_against(ref, fused(case, weighted=weighted, bias=bias, dtype=F64), 1e-11, "fused fp64")
    loss, grads = fused(case, weighted=weighted, bias=bias)
    check_against(ref, (loss, grads), RTOL, "fused fp32")
    keep = case["x_t"] != N
    assert torch.all(loss[keep] == 0) and torch.all(grads[0][keep] == 0) and torch.all(grads[1][N:] == 0)
    assert loss[~keep].min() > 0


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])  # inductor: ~10 s
def test_the_fused_chunk_expression_equals_the_in_place_one(compiled):
    """The expression torch.compile fuses (CUDA) against the eager in-place terms, run eagerly and compiled by
    inductor on the CPU (as on CUDA, where it runs)."""
    from sedd_scale.loss.masked_ce import FUSED, _terms

    case = make_case("absorb", seed=12)
    cfg = HeadLossConfig.for_graph("absorb", N, objective="masked_ce")
    sigma = case["sigma"][:, None].expand(B, L).reshape(-1)
    tok = cfg.objective.select(case["x_t"].reshape(-1), case["x_0"].reshape(-1), sigma, 0, N, torch.float32)
    z = case["hidden"].reshape(-1, H)[tok.rows] @ case["weight"][:N].t() + case["bias"][:N]
    lse, scale = torch.logsumexp(z, 1), torch.rand(len(tok.rows))
    want, got = _terms(z.clone(), tok, lse, scale), FUSED(compiled, z, tok.col0, tok.in0, tok.r0, lse, scale)
    assert_close(got[0], want[0], 1e-6, "loss")
    assert_close(got[1], want[1], 1e-6, "gradient", floor=1.0)
    loss_only = FUSED(compiled, z, tok.col0, tok.in0, tok.r0, lse, None)
    assert loss_only[1] is None
    assert_close(loss_only[0], got[0], 1e-7, "loss without gradient")


def test_denoiser_log_scores_give_score_entropy_equal_to_r0_ce():
    """log s = log_softmax(z) - log(e^sigma - 1): the reference score entropy (graph.score_entropy, with its K(r0)
    constant) of those ratios is r0 * CE exactly, and the ratios at a masked position sum to r0."""
    case = make_case("absorb", seed=13)
    graph = get_graph("absorb", N)
    z = case["hidden"].double() @ case["weight"].double().t() + case["bias"].double()
    sigma = case["sigma"].double()
    log_s = to_log_score(z, case["x_t"], sigma, num_tokens=N, graph_dim=N + 1, scale_by_sigma=False,
                         parametrization="denoiser")
    se = graph.score_entropy(log_s[..., : N + 1], sigma, case["x_t"], case["x_0"])
    torch.testing.assert_close(se, oracle_loss(case["hidden"].double(), case["weight"].double(),
                                               case["bias"].double(), case), rtol=1e-12, atol=1e-12)
    masked = case["x_t"] == N
    mass = log_s[..., :N].exp().sum(-1)[masked]
    r0 = (1 / torch.expm1(sigma))[:, None].expand(B, L)[masked]
    torch.testing.assert_close(mass, r0, rtol=1e-12, atol=0)
    assert torch.all(log_s[..., N + 1:] == float("-inf")) and torch.all(log_s[masked][:, N] == 0)


def _exact_denoiser_logits(enum: Enumerated, x_t: torch.Tensor, sigma: float) -> torch.Tensor:
    """log p(x0_i = y | x_t) (B, d, n) by Bayes over every clean sequence: p0(x0) prod_j p(x_t_j | x0_j)."""
    t = transition_matrix("absorb", enum.n, sigma)  # (dim, dim): column x0, row x_t
    clean = enum.clean
    joint = enum.p0[tuple(clean.T)][None, :] * t[x_t[:, None, :], clean[None, :, :]].prod(-1)  # (B, clean)
    post = torch.zeros(*x_t.shape, enum.n, dtype=F64)
    for i in range(enum.d):
        post[:, i].index_add_(1, clean[:, i], joint)
    return (post / post.sum(-1, keepdim=True)).clamp_min(1e-300).log()


def _masked_ce_fn(enum: Enumerated, chunk_size: int = 16):
    """A ScoreEntropyFn (x_t, total, x0) -> per-token masked_ce loss of the exact denoiser, through the fused head:
    hidden = the denoiser's logits (every state's, once per noise level), head weight = identity over the real
    tokens (MASK row zero)."""
    cfg = HeadLossConfig.for_graph("absorb", enum.n, chunk_size=chunk_size, objective="masked_ce")
    weight = torch.eye(enum.n + 1, enum.n, dtype=F64)
    place = enum.dim ** torch.arange(enum.d - 1, -1, -1)
    tables: dict[float, torch.Tensor] = {}

    def fn(x_t, total, x0):
        hidden = torch.empty(*x_t.shape, enum.n, dtype=F64)
        for sig in torch.unique(total):
            if float(sig) not in tables:
                tables[float(sig)] = _exact_denoiser_logits(enum, enum.states, float(sig))
            rows = total == sig
            hidden[rows] = tables[float(sig)][(x_t[rows] * place).sum(-1)]
        return score_entropy_head(hidden, weight, None, x_t, x0, total, cfg)
    return fn


def test_the_exact_denoiser_gives_the_exact_scores_elbo_and_bounds_the_nll():
    """On an enumerable joint: the exact denoiser p(x0_i | x_t) (by Bayes, not through the scores) as logits gives,
    with masked_ce through the fused head, the same per-sequence ELBO draws as score entropy with the exact scores;
    its quadrature plus the KL to the true p_1 is the NLL (the bound is tight), and with the documented base >= it."""
    enum = Enumerated("absorb", random_joint(3, 4, seed=21))
    graph, noise = get_graph("absorb", 3), get_noise("loglinear")
    x0 = enum.clean[[3, 40, 77]].repeat_interleave(4, 0)
    kw = dict(num_samples=4)
    mce, var_m = elbo_per_sequence(_masked_ce_fn(enum), graph, noise, x0, fused=True,
                                   generator=torch.Generator().manual_seed(3), **kw)
    se, var_s = elbo_per_sequence(enum.log_score_fn(), graph, noise, x0, generator=torch.Generator().manual_seed(3),
                                  **kw)
    torch.testing.assert_close(mce, se, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(var_m, var_s, rtol=1e-6, atol=1e-9)

    sigma1 = float(noise.total_noise(torch.tensor(1.0, dtype=F64)))
    fn, rows, states = _masked_ce_fn(enum, chunk_size=4096), enum.clean[[3, 40]], enum.states
    x_t, x0 = states.repeat(len(rows), 1), rows.repeat_interleave(len(states), 0)  # every state under each row
    xs, ws = np.polynomial.legendre.leggauss(12)
    edges = [0.0, 1e-3, 1e-2, 0.1, 0.5, 1.0, 2.0, 4.0, sigma1]
    integral = torch.zeros(len(rows), dtype=F64)
    for a, b in zip(edges[:-1], edges[1:]):
        for x, w in zip(xs, ws):
            sig = 0.5 * (b - a) * x + 0.5 * (b + a)
            loss = fn(x_t, torch.full((len(x_t),), sig, dtype=F64), x0).sum(-1).view(len(rows), -1)
            weights = torch.stack([enum.conditional(row, sig) for row in rows])
            integral += 0.5 * (b - a) * w * (weights * loss).sum(-1)
    p1 = enum.marginal(sigma1).reshape(-1)
    for k, row in enumerate(rows):
        q = enum.conditional(row, sigma1)
        keep = q > 0
        kl_true = float((q[keep] * (q[keep] / p1[keep]).log()).sum())
        nll = -math.log(float(enum.p0[tuple(row)]))
        bound = float(integral[k])
        assert abs(bound + kl_true - nll) < 1e-6 * max(1.0, nll), (bound + kl_true, nll)
        assert bound + float(prior_kl(graph, noise, row[None])[0]) >= nll - 1e-9


def _recipe(*overrides):
    return load_recipe("cpu-tiny", list(overrides))


def test_recipe_ties_the_objective_to_the_parametrization():
    """masked_ce needs model.parametrization: denoiser and model.scale_by_sigma: false, and refuses uniform; the
    errors name the keys; a consistent recipe loads and the head loss follows the model's parametrization."""
    from sedd_scale.distributed.pipeline import head_loss_config
    from sedd_scale.model.config import preset

    with pytest.raises(RecipeError, match=r"diffusion.objective='masked_ce'.*model.parametrization='ratios': set "
                                          r"model.parametrization: denoiser"):
        _recipe("diffusion.objective=masked_ce", "model.scale_by_sigma=false")
    with pytest.raises(RecipeError, match=r"model.scale_by_sigma.*softmax cancels.*model.parametrization: denoiser"):
        _recipe("diffusion.objective=masked_ce", "model.parametrization=denoiser")
    with pytest.raises(RecipeError, match=r"diffusion.objective='score_entropy'.*set model.parametrization: ratios"):
        _recipe("model.parametrization=denoiser", "model.scale_by_sigma=false")
    with pytest.raises(RecipeError, match=r"diffusion.objective='masked_ce' with model.graph='uniform'.*graphs "
                                          r"\['absorb'\], not 'uniform'"):
        _recipe("diffusion.objective=masked_ce", "model.graph=uniform", "model.scale_by_sigma=false")
    with pytest.raises(RecipeError, match="model.parametrization=denoiser is defined for the absorb graph only"):
        _recipe("diffusion.objective=masked_ce", "model.graph=uniform", "model.scale_by_sigma=false",
                "model.parametrization=denoiser")
    with pytest.raises(ValueError, match="masked_ce's softmax cancels"):
        HeadLossConfig.for_graph("absorb", N, scale_by_sigma=True, objective="masked_ce")
    r = _recipe("diffusion.objective=masked_ce", "model.parametrization=denoiser", "model.scale_by_sigma=false")
    assert r.model.parametrization == "denoiser"
    assert type(head_loss_config(r.model).objective).__name__ == "AbsorbMaskedCE"
    assert type(head_loss_config(preset("tiny")).objective).__name__ == "AbsorbScoreEntropy"


def test_the_parametrization_travels_through_the_hub_config():
    """A denoiser model's hub config.json marks it (the reference has no such key; ratios models stay as they were)
    and reads back as a denoiser."""
    from sedd_scale.checkpoint.hub import hub_config, model_config_from_hub
    from sedd_scale.model.config import preset

    spec = {"type": "loglinear", "eps": 1e-3}
    den = preset("tiny", parametrization="denoiser")
    cfg = hub_config(den, noise=spec)
    assert cfg["model"]["parametrization"] == "denoiser" and cfg["model"]["scale_by_sigma"] is False
    assert model_config_from_hub(cfg).parametrization == "denoiser"
    plain = hub_config(preset("tiny"), noise=spec, base=cfg)
    assert "parametrization" not in plain["model"] and model_config_from_hub(plain).parametrization == "ratios"


def _tp_worker(tp: int) -> dict:
    """This rank's fused masked_ce (both modes, bias on/off; a rank whose shard is padding only at TP=4) and its
    shard of the denoiser log-scores (explicit WORLD group), plus a TP=2 model's log-scores through megatron's group."""
    import torch.distributed as dist

    rank, out = dist.get_rank(), {}
    case = make_case("absorb", seed=14)
    for weighted in (False, True):
        for bias in (True, False):
            # Budget-sized chunks: ranks whose shards hold fewer real tokens (or none) must still cut the same chunks.
            loss, grads = fused(case, weighted=weighted, bias=bias, chunk_size=None, tp=tp, rank=rank,
                                group=dist.group.WORLD)
            out[weighted, bias] = (loss.numpy(), tuple(g.numpy() for g in grads))
    vl = V_PAD // tp
    z = case["hidden"] @ case["weight"][rank * vl:(rank + 1) * vl].t() + case["bias"][rank * vl:(rank + 1) * vl]
    out["log_score"] = to_log_score(z, case["x_t"], case["sigma"], num_tokens=N, graph_dim=N + 1,
                                    scale_by_sigma=False, vocab_start=rank * vl, parametrization="denoiser",
                                    group=dist.group.WORLD).numpy()
    if tp == 2:
        import sedd_scale.compat  # noqa: F401  (before megatron.core)

        from megatron.core import parallel_state

        from sedd_scale.distributed import parallel
        from sedd_scale.model import SEDD
        from sedd_scale.model.config import ModelConfig

        parallel.init_model_parallel(tp=tp, seed=5)
        cfg = ModelConfig(hidden_size=32, n_heads=2, n_blocks=1, cond_dim=16, num_tokens=N, length=L, dropout=0.0,
                          scale_by_sigma=False, parametrization="denoiser", vocab_multiple=8)
        model = SEDD(cfg, device="cpu").eval()
        torch.manual_seed(rank)  # the head starts at zero: give each shard different weights
        with torch.no_grad():
            model.output_layer.linear.weight.normal_()
            model.output_layer.linear.bias.normal_()
            out["model"] = parallel.gather_tp(model(case["x_t"], case["sigma"])).numpy()
        head = model.output_layer.linear
        out["head"] = (head.weight.detach().numpy(), head.bias.detach().numpy())
        x, c = model.hidden(case["x_t"], case["sigma"])
        out["features"] = model.output_layer.features(x, c).transpose(0, 1).detach().numpy()  # batch-first
        parallel_state.destroy_model_parallel()
    return out


@pytest.mark.slow
@pytest.mark.megatron
def test_tensor_parallel_masked_ce_and_log_scores_match_tp1():
    """TP = 2 and 4 (gloo processes; at TP=4 the last rank holds only padding and still joins each chunk's
    normalizer): loss, grads and denoiser log-scores equal TP = 1; a TP=2 SEDD's log-scores are its head's."""
    t = torch.from_numpy
    case = make_case("absorb", seed=14)
    for tp in (2, 4):
        ranks = launch(_tp_worker, tp, tp)
        for weighted in (False, True):
            for bias in (True, False):
                ref = fused(case, weighted=weighted, bias=bias)
                got = ranks[0][weighted, bias]
                for r in ranks:
                    assert np.array_equal(r[weighted, bias][0], got[0]), "loss differs across ranks"
                grads = (t(got[1][0]),) + tuple(torch.cat([t(r[weighted, bias][1][k]) for r in ranks])
                                                for k in range(1, len(got[1])))
                check_against(ref, (t(got[0]), grads), RTOL, f"TP={tp} weighted={weighted} bias={bias}")
        z = case["hidden"] @ case["weight"].t() + case["bias"]
        want = to_log_score(z, case["x_t"], case["sigma"], num_tokens=N, graph_dim=N + 1, scale_by_sigma=False,
                            parametrization="denoiser")
        got = torch.cat([t(r["log_score"]) for r in ranks], -1)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
        if tp == 2:
            w = torch.cat([t(r["head"][0]) for r in ranks])
            b = torch.cat([t(r["head"][1]) for r in ranks])
            z = t(ranks[0]["features"]).double() @ w.double().t() + b.double()
            want = to_log_score(z, case["x_t"], case["sigma"].double(), num_tokens=N, graph_dim=N + 1,
                                scale_by_sigma=False, parametrization="denoiser")
            torch.testing.assert_close(t(ranks[0]["model"]).double(), want, rtol=1e-5, atol=1e-4)
            masked = case["x_t"] == N
            mass = want[..., :N].exp().sum(-1)[masked]
            r0 = torch.exp(-log_expm1(case["sigma"].double()))[:, None].expand(B, L)[masked]
            torch.testing.assert_close(mass, r0, rtol=1e-9, atol=0)


def test_a_denoiser_hub_checkpoint_loads_samples_and_scores(tmp_path, release_process_group):
    """A denoiser's hub export loads as a denoiser (`sedd_scale.apps.api`), its log-scores at masked positions are
    ratios summing to r0 = 1 / (e^sigma - 1) (not the raw logits), and it generates and scores finite ELBOs."""
    from sedd_scale.apps.api import load_model
    from sedd_scale.checkpoint.hub import hub_config, write_hub
    from sedd_scale.model.config import ModelConfig
    from tests.test_model import random_hub_state

    cfg = ModelConfig(hidden_size=32, n_heads=2, n_blocks=1, cond_dim=16, num_tokens=257, length=16, dropout=0.0,
                      vocab_multiple=1, scale_by_sigma=False, parametrization="denoiser")
    path = write_hub(tmp_path / "den", hub_config(cfg, noise={"type": "loglinear"}), random_hub_state(cfg, seed=4))
    model = load_model(path, device="cpu")
    assert model.config.parametrization == "denoiser"
    x = torch.full((2, 16), 257)
    x[:, :4] = torch.arange(4)
    sigma = torch.tensor([0.05, 3.0], dtype=F64)
    log_s = model._log_score(x, sigma)
    mass = log_s[:, 4:, :257].double().exp().sum(-1)
    torch.testing.assert_close(mass, torch.exp(-log_expm1(sigma))[:, None].expand_as(mass), rtol=1e-5, atol=0)
    texts = model.generate(2, steps=8, length=16, seed=1)  # the byte tokenizer is inferred from 257 tokens
    assert len(texts) == 2 and all(isinstance(t, str) and t for t in texts)
    scores = model.score([[5, 6, 7, 8, 9, 10]], draws=4)
    assert math.isfinite(scores[0].nats_per_token) and scores[0].nats_per_token > 0


def test_evaluating_a_denoiser_without_a_saved_recipe_uses_masked_ce(tmp_path):
    """tools/evaluate.py on a hub export (no recipe inside) builds a recipe whose objective matches the model."""
    from sedd_scale.cli.evaluate import _recipe_for_weights
    from sedd_scale.config import Recipe, from_dict
    from sedd_scale.diffusion.noise import noise_spec
    from sedd_scale.model.config import preset
    from sedd_scale.pretrained import Weights

    denoiser = preset("tiny", parametrization="denoiser")
    for cfg, objective in ((denoiser, "masked_ce"), (preset("tiny"), "score_entropy")):
        weights = Weights(cfg, noise_spec(get_noise("loglinear")), {}, None)
        data = _recipe_for_weights(weights, tmp_path, None, tp=1, pp=1, micro_batch=2, dp=1)
        assert from_dict(Recipe, data).diffusion.objective == objective


@pytest.mark.megatron
def test_a_denoiser_models_fused_elbo_is_score_entropy_of_its_log_scores(tp1):
    """Through a SEDD with random weights: the dataset ELBO (`diffusion.evaluation.evaluate`) from the fused masked_ce
    head loss (what trainer.validate and tools/evaluate.py use) equals the one from the unfused score entropy of the
    model's own log-scores (what samplers read), same draws: the two paths of a denoiser checkpoint agree."""
    from sedd_scale.data.loader import EvalBatch
    from sedd_scale.diffusion.evaluation import evaluate
    from sedd_scale.distributed.pipeline import head_loss, head_loss_config
    from sedd_scale.model import SEDD
    from sedd_scale.model.config import ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, n_heads=2, n_blocks=1, cond_dim=16, num_tokens=N, length=12, dropout=0.0,
                      vocab_multiple=8, scale_by_sigma=False, parametrization="denoiser")
    model = SEDD(cfg, device="cpu").eval()
    with torch.no_grad():  # the head and the adaLN start at zero: make the logits depend on the input
        for p in model.output_layer.parameters():
            p.normal_(0, 0.5)
    graph, noise, loss_cfg = get_graph("absorb", N), get_noise("loglinear"), head_loss_config(cfg)

    def fused_loss(x0, x_t, total, rate):
        features = model.output_layer.features(*model.hidden(x_t, total))
        return float(head_loss(model.output_layer, features, x0, x_t, total, rate, loss_cfg)[0])

    def unfused_loss(x0, x_t, total, rate):
        se = graph.score_entropy(model(x_t, total)[..., : N + 1].double(), total.double(), x_t, x0)
        return float((rate.double()[:, None] * se).sum(1).mean())

    gen = torch.Generator().manual_seed(1)
    batches = [EvalBatch(torch.randint(0, N, (4, 12), generator=gen), torch.tensor([True, True, True, False]), i)
               for i in range(2)]
    with torch.no_grad():
        a = evaluate(fused_loss, graph, noise, batches, draws=4, seed=3)
        b = evaluate(unfused_loss, graph, noise, batches, draws=4, seed=3)
    assert a.num_tokens == b.num_tokens == 6 * 12
    assert a.nats_per_token == pytest.approx(b.nats_per_token, rel=1e-5)
    assert a.stderr == pytest.approx(b.stderr, rel=1e-3)
    assert math.log(N) * 0.5 < a.nats_per_token < 50

