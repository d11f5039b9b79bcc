"""Optional kernels: the choice on this machine (no CUDA: torch), and with apex present on a (simulated) CUDA device."""
from __future__ import annotations

import importlib.machinery
import logging
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from sedd_scale import accelerators
from tests.fake_apex import FusedAdam


@pytest.fixture
def fake_apex(monkeypatch):
    """apex modules that record calls (their LayerNorm computes torch's; their FusedAdam keeps apex's state layout),
    importable like the real ones."""
    calls = []

    def fused_layer_norm_affine(x, weight, bias, shape, eps):
        calls.append((x.dtype, weight.dtype, bias.dtype))
        return F.layer_norm(x, shape, weight, bias, eps)

    modules = {"apex": types.ModuleType("apex"), "apex.normalization": types.ModuleType("apex.normalization"),
               "apex.normalization.fused_layer_norm": types.ModuleType("apex.normalization.fused_layer_norm"),
               "apex.optimizers": types.ModuleType("apex.optimizers")}
    modules["apex.normalization.fused_layer_norm"].fused_layer_norm_affine = fused_layer_norm_affine
    modules["apex.optimizers"].FusedAdam = FusedAdam
    for name, module in modules.items():
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        monkeypatch.setitem(sys.modules, name, module)
    accelerators.choose.cache_clear()
    accelerators._apex_layer_norm.cache_clear()
    yield calls, FusedAdam
    accelerators.choose.cache_clear()
    accelerators._apex_layer_norm.cache_clear()


def test_without_cuda_everything_is_torch(fake_apex):
    choice = accelerators.choose(cuda=False)
    assert (choice.layer_norm, choice.adam) == ("torch", "torch") and "no CUDA" in choice.reason
    assert accelerators.adam_class(choice) is torch.optim.AdamW


def test_apex_on_cuda_is_used_and_its_layer_norm_matches_torch(fake_apex, caplog):
    calls, fused_adam = fake_apex
    with caplog.at_level(logging.INFO, logger="sedd_scale.accelerators"):
        choice = accelerators.choose(cuda=True)
        assert accelerators.choose(cuda=True) is choice
    assert (choice.layer_norm, choice.adam) == ("apex", "apex")
    assert [r.message for r in caplog.records].count(choice.describe()) == 1  # logged once
    assert accelerators.adam_class(choice) is fused_adam
    x, w = torch.randn(2, 3, 8, dtype=torch.bfloat16), torch.randn(8, dtype=torch.bfloat16)
    ours = accelerators.layer_norm(x, w, 1e-5, choice)
    reference = accelerators.layer_norm(x, w, 1e-5, accelerators.choose(cuda=False))
    assert calls == [(torch.float32, torch.float32, torch.float32)]  # computed in float32, like torch's path
    assert ours.dtype == reference.dtype == torch.float32
    torch.testing.assert_close(ours, reference)
    assert accelerators.choose(cuda=True, compiled=True).layer_norm == "torch"  # inductor fuses torch's


def test_without_apex_cuda_uses_torch_fused_adam(monkeypatch):
    accelerators.choose.cache_clear()
    monkeypatch.setattr(accelerators, "_importable", lambda name: False)
    choice = accelerators.choose(cuda=True)
    assert (choice.layer_norm, choice.adam, choice.transformer_engine) == ("torch", "torch-fused", "absent")
    accelerators.choose.cache_clear()


def test_the_optimizer_and_layer_norm_take_the_choice(fake_apex):
    """apex's FusedAdam runs under the same non-finite guard; the model's LayerNorm calls apex's kernel when chosen
    and computes what torch's path does (norm, weight, then the adaLN modulation)."""
    from sedd_scale.distributed.optim import GuardedAdamW, SkipGuard, guarded
    from sedd_scale.model import ModelConfig
    from sedd_scale.model.transformer import LayerNorm

    calls, fused_adam = fake_apex
    assert guarded(torch.optim.AdamW) is GuardedAdamW
    cls = guarded(fused_adam)
    assert issubclass(cls, SkipGuard) and issubclass(cls, fused_adam)
    w = torch.nn.Parameter(torch.ones(3))
    w.grad = torch.ones(3)
    opt = cls([w], lr=0.1)
    opt.grad_norm = lambda: float("nan")
    opt.step()
    assert opt.overflow and torch.equal(w.detach(), torch.ones(3))
    opt.grad_norm = lambda: 1.0
    opt.step()
    assert not opt.overflow and bool((w.detach() < 1).all())

    norm = LayerNorm(8, torch.float32, torch.device("cpu"), ModelConfig())
    assert norm.kernels.layer_norm == "torch"  # no CUDA here
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 8, generator=g)
    shift, scale = torch.randn(2, 1, 8, generator=g), torch.randn(2, 1, 8, generator=g)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(8, generator=g))
    want = norm(x, shift, scale)
    norm.kernels = accelerators.choose(cuda=True)
    got = norm(x, shift, scale)
    assert len(calls) == 1
    torch.testing.assert_close(got, want)


def test_zero3_steps_with_torch_adamw_not_apex(fake_apex, monkeypatch):
    """DeepSpeed's ZeRO-3 calls step() once per sub-group; apex would count its bias-correction step per call."""
    from sedd_scale.config import OptimConfig
    from sedd_scale.distributed import engine

    _, fused_adam = fake_apex
    monkeypatch.setattr(engine.accelerators, "adam_class", lambda choice: fused_adam)  # as accelerators picks on CUDA
    model = torch.nn.Linear(4, 4)
    for stage, want in ((0, fused_adam), (1, fused_adam), (2, fused_adam), (3, torch.optim.AdamW)):
        opt, _ = engine.build_optimizer(model, OptimConfig(), total_steps=4, zero_stage=stage)
        assert isinstance(opt, want) and (want is torch.optim.AdamW or not isinstance(opt, torch.optim.AdamW)), stage
