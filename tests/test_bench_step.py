"""benchmarks/bench_step.py: its reference step is the reference's computation, and its variants are what they say.

* The re-implemented reference network (the reference's parameter names) reproduces the output of the unmodified
  reference code stored in tests/fixtures/sedd_reference/model_absorb, and the reference step trains (DDP over a
  world of one, as run_train.py runs it).
* `check_compile` refuses a trainer whose compile switches are not all the variant's: the case this benchmark
  once measured as "eager" (the trainer built compiled, then only `model.compile` flipped, so the fused loss stayed
  compiled); `check_regions` refuses a step that called a compiled region with the other switch.

Each check runs in a spawned process (sedd_scale.testing.spawn): the reference's TorchScript settings, the trainer's
process group and the inductor cache setting stay out of the test process.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import pytest

from tests.dist import launch

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "sedd_reference" / "model_absorb"


def _bench_step():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_step

    return bench_step


def _reference_model_and_step() -> dict:
    import torch
    from safetensors.torch import load_file

    bs = _bench_step()
    out = {}
    config = __import__("json").loads((FIXTURE / "config.json").read_text())
    m = config["model"]
    model = bs.RefSEDD(m["hidden_size"], m["n_heads"], m["n_blocks"], m["cond_dim"], config["tokens"],
                       config["graph"]["type"], m["dropout"], m["scale_by_sigma"])
    model.load_state_dict(load_file(str(FIXTURE / "model.safetensors")), strict=True)
    io = load_file(str(FIXTURE / "io.safetensors"))
    with torch.no_grad():
        got = model.eval()(io["indices"], io["sigma"])
    out["fixture_max_abs_diff"] = float((got - io["output_f32"]).abs().max())
    out["train_mode_differs"] = not torch.equal(model.train()(io["indices"], io["sigma"]).detach(), got)  # dropout
    for graph in ("absorb", "uniform"):
        case = bs.Case(f"t-{graph}", 32, 2, 1, 16, graph, 2, 16, num_tokens=40)
        torch.manual_seed(0)
        step = bs.RefStep(case, 0.1)  # DDP over the spawned world of one
        with bs.region_calls() as calls:
            losses = [step() for _ in range(3)]
        out[graph] = dict(losses=losses, ddp=type(step.model).__name__, calls=calls, lr=step.opt.param_groups[0]["lr"],
                          ema_updates=step.ema.n, grads_cleared=all(p.grad is None for p in step.model.parameters()))
    return out


def test_reference_model_reproduces_the_reference_code_and_its_step_trains():
    out = launch(_reference_model_and_step, 1, timeout=600)[0]
    assert out["fixture_max_abs_diff"] <= 1e-5, out["fixture_max_abs_diff"]
    assert out["train_mode_differs"]
    for graph in ("absorb", "uniform"):
        got = out[graph]
        assert all(math.isfinite(v) and v > 0 for v in got["losses"]), got
        assert got["ddp"] == "DistributedDataParallel"
        assert got["calls"] == []  # none of sedd_scale's compiled regions
        assert got["lr"] == pytest.approx(3e-4 * 3 / 2500)  # the reference's warmup, step 3
        assert got["ema_updates"] == 3 and got["grads_cleared"]


def _variants() -> dict:
    import tempfile

    bs = _bench_step()
    from sedd_scale.distributed import parallel

    case = bs.Case("t-uniform", 32, 2, 1, 16, "uniform", 2, 16, num_tokens=40)
    out = {}
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        eager = bs.build_trainer(case, 0.1, a, compile=False)
        compiled = bs.build_trainer(case, 0.1, b, compile=True)
        try:
            bs.check_compile(eager, False, "ours eager")
            bs.check_compile(compiled, True, "ours compiled")
            out["kinds"] = sorted({kind for _, kind, _ in bs.compile_flags(eager)})
            out["eager_as_compiled"] = _refusal(lambda: bs.check_compile(eager, True, "ours compiled"))
            # What the benchmark once did for "eager": build compiled, then flip the model's switch only.
            compiled.model_cfg.compile = False
            out["flipped_model_only"] = _refusal(lambda: bs.check_compile(compiled, False, "ours eager"))
            compiled.model_cfg.compile = True
            step = bs.checked_step(eager.train_step, False, "ours eager")
            with bs.region_calls() as calls:
                step()
            out["eager_regions"] = sorted({name for name, _ in calls})
            out["eager_region_flags"] = sorted({flag for _, flag in calls})
            step()  # later calls are not checked again
            out["wrong_region"] = _refusal(lambda: bs.check_regions([("_norm_modulate", False),
                                                                     ("_uniform_fused", True)], False, "ours eager"))
            out["no_region"] = _refusal(lambda: bs.check_regions([], True, "ours compiled"))
            out["region_in_reference"] = _refusal(lambda: bs.check_regions([("_gate_residual", False)], None,
                                                                           bs.reference_label()))
        finally:
            eager.saver.close()
            compiled.saver.close()
            parallel.destroy_parallel()
    return out


def _refusal(fn) -> str | None:
    try:
        fn()
    except AssertionError as e:
        return str(e)
    return None


def test_variants_are_what_their_names_say():
    out = launch(_variants, 1, timeout=600)[0]
    assert out["kinds"] == ["HeadLossConfig", "ModelConfig"]
    assert "must run with every compile switch on" in out["eager_as_compiled"]
    # The old "eager" variant: the model's switch off, the fused loss's still on.
    refusal = out["flipped_model_only"]
    assert refusal is not None and "loss_cfg (HeadLossConfig)" in refusal, refusal
    assert "trainer.model_cfg" not in refusal
    assert out["eager_regions"] == ["_gate_residual", "_norm_modulate", "_rotary_heads"]
    assert out["eager_region_flags"] == [False]
    assert "_uniform_fused called with compile=True" in out["wrong_region"]
    assert "no region was called" in out["no_region"]
    assert "ran sedd_scale's compiled regions" in out["region_in_reference"]


def test_build_trainer_needs_the_compile_switch():
    """No default: a caller says which switch it measures."""
    import inspect

    params = inspect.signature(_bench_step().build_trainer).parameters
    assert params["compile"].kind is inspect.Parameter.KEYWORD_ONLY
    assert params["compile"].default is inspect.Parameter.empty
    assert set(_bench_step().VARIANTS.values()) == {False, True}
    assert dataclasses.is_dataclass(_bench_step().Case)
