"""Regional compilation (model.compile) against the eager network on CPU (torch.compile with inductor).

The compiled regions are the same arithmetic fused (and recomputed in backward where that is cheaper),
so they agree with eager to float32 rounding: outputs within 1e-5 relative to their largest entry and
every gradient within 1e-5 relative to its largest entry (measured: ~1e-6). Dropout stays eager, so a
seed gives the same masks in both modes. The layouts (TP, PP, ZeRO, activation checkpointing) are
checked end to end by tests/test_compile_layouts.py.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch._dynamo

from sedd_scale import compiled
from sedd_scale.checkpoint.hub import load_hub_state
from sedd_scale.distributed import parallel
from sedd_scale.loss import score_entropy
from sedd_scale.model import SEDD, preset, transformer
from tests.dist import launch
from tests.test_model import random_hub_state

# The regions a one-stage pipeline on CPU runs (the absorb loss stays eager on CPU: the uniform graph's is compiled).
REGIONS = {"norm_modulate": transformer.NORM_MODULATE, "rotary_heads": transformer.ROTARY_HEADS,
           "gate_residual": transformer.GATE_RESIDUAL, "uniform loss": score_entropy.UNIFORM_FUSED}

RTOL = 1e-5
BF16_RTOL = 2**-6  # a few bf16 ulps: fused bf16 elementwise work rounds once (in fp32 inside), eager at every op


def _error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30)).item()


def _close(a: torch.Tensor, b: torch.Tensor, what: str, rtol: float = RTOL) -> None:
    err = _error(a, b)
    assert err <= rtol, f"{what}: {err:.3g} relative to the largest entry"


def _run(cfg, state, x, sigma, *, seed: int, train: bool = True):
    """Log-scores and every parameter's gradient of sum(log-scores over the real states)."""
    model = SEDD(cfg, device="cpu")
    load_hub_state(model, state)
    model.train(train)
    parallel.seed_parallel(seed)
    if not train:
        with torch.no_grad():
            return model(x, sigma), []
    out = model(x, sigma)
    out[..., : cfg.vocab_size].sum().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.slow  # compilation: ~10 s per variant on 2 cores with a cold inductor cache
@pytest.mark.parametrize("variant", ["plain", "dropout+checkpointing", "bf16-mixed", "bf16"])
def test_compiled_blocks_equal_eager(tp1, variant):
    """Forward and backward of the whole network, compiled vs eager, within RTOL; under bf16-mixed and bf16 weights
    (the 1.3B/7B recipes) within a few bf16 ulps, and bf16-mixed no farther from the fp32 network than eager is."""
    extra = {"plain": {}, "dropout+checkpointing": {"dropout": 0.2, "activation_checkpointing": True},
             "bf16-mixed": {"precision": "bf16-mixed"}, "bf16": {"precision": "bf16"}}[variant]
    base = preset("tiny", **{"hidden_size": 64, "n_heads": 4, "n_blocks": 2, "cond_dim": 32, "num_tokens": 50,
                             "vocab_multiple": 1, "length": 16, "dropout": 0.0, **extra})
    state = random_hub_state(base, seed=3)
    g = torch.Generator().manual_seed(4)
    x, sigma = torch.randint(0, 51, (3, 16), generator=g), torch.rand(3, generator=g) + 0.1
    eager, eager_grads = _run(base, state, x, sigma, seed=5)
    compiled, compiled_grads = _run(dataclasses.replace(base, compile=True), state, x, sigma, seed=5)
    finite = torch.isfinite(eager)
    assert torch.equal(finite, torch.isfinite(compiled))  # -inf padding / MASK columns in the same places
    rtol = BF16_RTOL if variant.startswith("bf16") else RTOL
    _close(compiled[finite], eager[finite], f"{variant} log-scores", rtol)
    for i, (a, b) in enumerate(zip(compiled_grads, eager_grads, strict=True)):
        _close(a, b, f"{variant} gradient {i}", rtol)
    assert max(g.abs().max().item() for g in eager_grads) > 0  # the comparison is not of zeros
    if variant == "bf16-mixed":
        exact, _ = _run(dataclasses.replace(base, precision="fp32"), state, x, sigma, seed=5)
        assert _error(compiled[finite], exact[finite]) <= 1.5 * _error(eager[finite], exact[finite])


@pytest.mark.slow
def test_compiled_evaluation_and_new_shapes(tp1):
    """Without gradients (evaluation, sampling) and for other batch shapes the compiled network still equals eager."""
    base = preset("tiny", hidden_size=64, n_heads=4, n_blocks=2, cond_dim=32, num_tokens=50, vocab_multiple=1,
                  length=16, dropout=0.0)
    state = random_hub_state(base, seed=6)
    for rows in (2, 5):
        x, sigma = torch.randint(0, 51, (rows, 16)), torch.rand(rows) + 0.1
        eager, _ = _run(base, state, x, sigma, seed=1, train=False)
        compiled, _ = _run(dataclasses.replace(base, compile=True), state, x, sigma, seed=1, train=False)
        finite = torch.isfinite(eager)
        _close(compiled[finite], eager[finite], f"no-grad log-scores, {rows} rows")


def test_compile_without_a_cpp_compiler_is_a_clear_error(tp1, monkeypatch):
    """On CPU, torch.compile builds its kernels with a C++ compiler: without one the model refuses to build, naming
    the fix, instead of failing at the first step."""
    import torch._inductor.cpp_builder as cpp_builder

    monkeypatch.setattr(compiled.shutil, "which", lambda name: None)
    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", lambda: "g++")
    cfg = preset("tiny", num_tokens=50, vocab_multiple=1, compile=True)
    with pytest.raises(RuntimeError, match="needs a C\\+\\+ compiler.*model.compile: false"):
        SEDD(cfg, device="cpu")
    SEDD(dataclasses.replace(cfg, compile=False), device="cpu")  # eager needs none


def _warm_up_then_train(tmp: str) -> dict:
    """Two pipeline runners (one stage) from one seed, with dropout: one warmed up, one not; what each did."""
    import copy

    import sedd_scale.compat  # noqa: F401  (before megatron-core / DeepSpeed)

    from sedd_scale.config import Recipe, from_dict
    from sedd_scale.diffusion.graph import get_graph
    from sedd_scale.distributed import engine
    from sedd_scale.distributed.pipeline import head_loss_config
    from sedd_scale.distributed.runner import PipelineRunner
    from sedd_scale.train.noising import noise_batch
    from tests.test_trainer import recipe_dict

    data = recipe_dict(tmp)
    data["model"] = {**copy.deepcopy(data["model"]), "compile": True, "dropout": 0.2, "graph": "uniform",
                     "scale_by_sigma": False}  # dropout: a moved RNG stream shows; uniform: a compiled loss on CPU
    recipe = from_dict(Recipe, data)
    layout, topology = engine.setup(recipe)
    cfg, noise = recipe.model, recipe.diffusion.schedule()
    graph = get_graph("uniform", num_tokens=cfg.num_tokens)
    rows = torch.randint(0, cfg.num_tokens, (layout.global_batch, recipe.data.seq_len),
                         generator=torch.Generator().manual_seed(7))

    def micro_batches(step: int):
        for m in range(layout.grad_accum):
            sl = slice(m * layout.micro_batch, (m + 1) * layout.micro_batch)
            nb = noise_batch(rows[sl], graph, noise, seed=1, step=step, row_offset=sl.start,
                             global_rows=layout.global_batch)
            yield nb.x0, nb.x_t, nb.total_noise, nb.rate

    out = {}
    for warm in (True, False):
        parallel.seed_parallel(3)
        before = compiled.compilations()
        runner = PipelineRunner(cfg, recipe, layout, topology, head_loss_config(cfg, "score_entropy"),
                                torch.device("cpu"), warm_up=next(micro_batches(0)) if warm else None)
        built = compiled.compilations()
        out[warm] = {"compilations": built - before, "rng": torch.get_rng_state(),
                     "params": [p.detach().clone() for p in runner.engine.module.parameters()],
                     "grads": [p.grad for p in runner.engine.module.parameters()], "records": runner.records.take()}
        if warm:
            out["regions compiled"] = {name: region._compiled is not None for name, region in REGIONS.items()}
        losses = [float(runner.train_batch(micro_batches(step))) for step in range(2)]
        x0, x_t, total_noise, rate = next(micro_batches(5))
        losses.append(runner.eval_loss(x0, x_t, total_noise, rate))
        out[warm].update(losses=losses, step_compilations=compiled.compilations() - built)
    parallel.destroy_parallel()
    return out


@pytest.mark.slow  # one process with DeepSpeed's pipeline engine and the regions' compiles (~30 s on 2 cores)
def test_pipeline_warm_up_compiles_every_region_and_changes_nothing(tmp_path):
    """The warm-up compiles all the stage's regions (forward, backward, evaluation) so that the steps after it compile
    nothing, and leaves RNG streams, parameters, gradients and loss records as they were: the losses of two steps
    (with dropout) and an evaluation equal bitwise those of a runner without it."""
    out = launch(_warm_up_then_train, 1, str(tmp_path), timeout=600)[0]
    warm, cold = out[True], out[False]
    assert warm["compilations"] > 0 and cold["compilations"] == 0
    assert out["regions compiled"] == {name: True for name in REGIONS}
    assert warm["step_compilations"] == 0
    assert torch.equal(warm["rng"], cold["rng"])
    assert all(torch.equal(a, b) for a, b in zip(warm["params"], cold["params"], strict=True))
    assert warm["grads"] == cold["grads"] == [None] * len(warm["params"])
    assert warm["records"] == cold["records"] == []
    assert warm["losses"] == cold["losses"]


def test_a_compiled_region_call_does_not_patch_dynamo_config(monkeypatch):
    """Dynamo's settings are applied once (configure_dynamo), not entered around every region call, and the region
    still computes its function."""
    calls = []
    config_module = type(torch._dynamo.config)  # a ConfigModule: its attributes are the settings, `patch` a method
    real_patch = config_module.patch
    monkeypatch.setattr(config_module, "patch", lambda *a, **k: calls.append(1) or real_patch(*a, **k))
    region = compiled.Region(lambda x, y: x * y + 1)
    x, y = torch.arange(6.0).view(2, 3), torch.full((2, 3), 2.0)
    for _ in range(3):
        torch.testing.assert_close(region(True, x, y), x * 2 + 1, rtol=0, atol=0)
    assert calls == []
    name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    assert getattr(torch._dynamo.config, name) >= compiled.GRAPHS
