"""AdamW state across torch's AdamW (step per parameter) and apex's FusedAdam (step per group): the layouts are
told apart, converted both ways, and a run continued by the other implementation takes the updates an
uninterrupted run takes (bias correction continues). The fake FusedAdam is first checked against a float64
AdamW written out here."""
from __future__ import annotations

import pytest
import torch

from sedd_scale.distributed import optim_state
from sedd_scale.distributed.optim import GuardedAdamW, guarded
from tests.fake_apex import FusedAdam

LR, BETAS, EPS, WD = 0.05, (0.9, 0.99), 1e-8, 0.1


def _params() -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(4, 3, generator=g)), torch.nn.Parameter(torch.randn(3, generator=g))]


def _groups(params):
    # as engine.build_optimizer: matrices decay, the rest does not
    return [{"params": [params[0]], "weight_decay": WD, "decay": True},
            {"params": [params[1]], "weight_decay": 0.0, "decay": False}]


def _apex(params):
    return guarded(FusedAdam)(_groups(params), lr=LR, betas=BETAS, eps=EPS, adam_w_mode=True)


def _torch(params):
    return GuardedAdamW(_groups(params), lr=LR, betas=BETAS, eps=EPS, fused=True)


def _grads(params, step: int) -> None:
    """Gradients that depend on the parameters and the step, so a wrong update changes every later one."""
    g = torch.Generator().manual_seed(100 + step)
    x, y = (torch.randn(n, generator=g).to(params[0].dtype) for n in ((5, 3), (5, 4)))
    for p in params:
        p.grad = None
    loss = ((x @ params[0].T + params[1].sum() - y) ** 2).mean()
    loss.backward()


def _train(optimizer, params, steps: range) -> None:
    for step in steps:
        _grads(params, step)
        optimizer.step()


def _float64_adamw(steps: int) -> list[torch.Tensor]:
    """The oracle: AdamW written out in float64 (decoupled decay, bias-corrected moments)."""
    params = [p.detach().double().requires_grad_() for p in _params()]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t in range(1, steps + 1):
        _grads(params, t - 1)
        with torch.no_grad():
            for i, (p, wd) in enumerate(zip(params, (WD, 0.0))):
                m[i] = BETAS[0] * m[i] + (1 - BETAS[0]) * p.grad
                v[i] = BETAS[1] * v[i] + (1 - BETAS[1]) * p.grad ** 2
                m_hat, v_hat = m[i] / (1 - BETAS[0] ** t), v[i] / (1 - BETAS[1] ** t)
                p -= LR * (m_hat / (v_hat.sqrt() + EPS) + wd * p)
    return [p.detach() for p in params]


@pytest.mark.parametrize("make", [_apex, _torch], ids=["fake-apex", "torch"])
def test_both_adamws_match_a_float64_oracle(make):
    params = _params()
    _train(make(params), params, range(6))
    for got, want in zip(params, _float64_adamw(6)):
        torch.testing.assert_close(got.detach().double(), want, rtol=1e-5, atol=1e-6)


def test_the_fake_apex_keeps_its_step_in_the_groups():
    params = _params()
    opt = _apex(params)
    assert optim_state.detect(opt.state_dict()) == optim_state.APEX and optim_state.step_count(opt) == 0
    _train(opt, params, range(3))
    sd = opt.state_dict()
    assert [g["step"] for g in sd["param_groups"]] == [3, 3]
    assert all(set(s) == {"exp_avg", "exp_avg_sq"} for s in sd["state"].values())
    assert sd[optim_state.LAYOUT_KEY] == optim_state.APEX and optim_state.step_count(sd) == 3


@pytest.mark.parametrize("first,second", [(_apex, _torch), (_torch, _apex)], ids=["apex-then-torch", "torch-then-apex"])
def test_a_run_continued_by_the_other_adamw_matches_an_uninterrupted_one(first, second):
    reference = _params()
    _train(_torch(reference), reference, range(6))

    params = _params()
    before = first(params)
    _train(before, params, range(3))
    saved = before.state_dict()
    after = second(params)
    after.load_state_dict(saved)
    assert optim_state.step_count(after) == 3
    _train(after, params, range(3, 6))
    for got, want in zip(params, reference):
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-7)

    # The check can fail: the same continuation with the step count restarted is far off.
    restarted = _params()
    opt = first(restarted)
    _train(opt, restarted, range(3))
    fresh = second(restarted)
    fresh.load_state_dict(opt.state_dict())
    optim_state.set_step(fresh, 0)  # what a load that lost the step count did
    _train(fresh, restarted, range(3, 6))
    assert float((restarted[0] - reference[0]).detach().abs().max()) > 1e-3


def test_group_settings_follow_the_loading_optimizer():
    params = _params()
    apex = _apex(params)
    _train(apex, params, range(2))
    converted = optim_state.convert(apex.state_dict(), optim_state.TORCH, _torch(_params()).param_groups)
    group = converted["param_groups"][0]
    assert "bias_correction" not in group and "step" not in group and group["fused"] is True
    assert group["decay"] is True and group["weight_decay"] == WD  # our own and shared keys are carried
    assert all(float(s["step"]) == 2 for s in converted["state"].values())

    torch_opt = _torch(params)
    _train(torch_opt, params, range(2))
    to_apex = optim_state.convert(torch_opt.state_dict(), optim_state.APEX)  # no template: apex's default
    assert [g["step"] for g in to_apex["param_groups"]] == [2, 2]
    assert all(g["bias_correction"] is True and "fused" not in g for g in to_apex["param_groups"])
    assert all("step" not in s for s in to_apex["state"].values())
    # the input is left as it was
    assert all("step" in s for s in torch_opt.state_dict()["state"].values())


def test_unmarked_states_are_recognised_and_inconsistent_ones_refused():
    params = _params()
    apex, plain = _apex(params), _torch(_params())
    _train(apex, params, range(2))
    unmarked = {k: v for k, v in apex.state_dict().items() if k != optim_state.LAYOUT_KEY}
    assert optim_state.detect(unmarked) == optim_state.APEX
    assert optim_state.detect({"state": {}, "param_groups": [{"params": []}]}) is None
    plain.load_state_dict(unmarked)
    assert optim_state.step_count(plain) == 2

    wrong_mark = {**unmarked, optim_state.LAYOUT_KEY: optim_state.TORCH}
    with pytest.raises(optim_state.OptimizerStateError, match="marked 'torch'"):
        optim_state.detect(wrong_mark)
    no_step = {"state": {0: {"exp_avg": torch.zeros(1), "exp_avg_sq": torch.zeros(1)}},
               "param_groups": [{"params": [0]}]}
    with pytest.raises(optim_state.OptimizerStateError, match="no step count"):
        optim_state.detect(no_step)
    both = {"state": {0: {"step": torch.tensor(1.0)}}, "param_groups": [{"params": [0], "step": 1}]}
    with pytest.raises(optim_state.OptimizerStateError, match="both per group and per parameter"):
        optim_state.detect(both)
    uneven = {"state": {0: {"step": torch.tensor(1.0)}, 1: {"step": torch.tensor(2.0)}},
              "param_groups": [{"params": [0, 1]}]}
    with pytest.raises(optim_state.OptimizerStateError, match="different AdamW steps"):
        optim_state.convert(uneven, optim_state.APEX)
    with pytest.raises(optim_state.OptimizerStateError, match="differs"):
        optim_state.step_count(uneven)
    uncorrected = {"state": {}, "param_groups": [{"params": [], "step": 3, "bias_correction": False}]}
    with pytest.raises(optim_state.OptimizerStateError, match="bias correction"):
        optim_state.convert(uncorrected, optim_state.TORCH)
    with pytest.raises(optim_state.OptimizerStateError, match="neither torch's AdamW nor a FusedAdam"):
        optim_state.layout_of_class(torch.optim.SGD)


def test_set_step_and_fresh_state_follow_the_layout():
    params = _params()
    apex, plain = _apex(params), _torch(params)
    for opt in (apex, plain):
        for group in opt.param_groups:
            for p in group["params"]:
                opt.state[p] = optim_state.fresh_state(opt, p, group)
        optim_state.set_step(opt, 7)
        assert optim_state.step_count(opt) == 7
    assert all("step" not in s for s in apex.state.values()) and [g["step"] for g in apex.param_groups] == [7, 7]
    assert all(float(s["step"]) == 7 for s in plain.state.values())
    optim_state.set_step(apex, 0)
    assert all("step" not in g for g in apex.param_groups)
