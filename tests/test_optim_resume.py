"""A run trained with apex's FusedAdam (a CPU fake with its state layout) resumes with torch's AdamW and the
reverse, through DeepSpeed's checkpoints, with the losses and weights of an uninterrupted run; an apex
checkpoint consolidates and reshards, and the resharded step resumes."""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from sedd_scale.distributed import deepspeed_files as ds_files
from sedd_scale.distributed import optim_state
from tests.dist import launch
from tests.test_trainer import LOSS_RTOL, recipe_dict

pytestmark = [pytest.mark.slow]


@contextlib.contextmanager
def _adam(apex: bool):
    """Build the trainer's optimizer from the fake FusedAdam (apex) or torch's AdamW."""
    from sedd_scale import accelerators
    from tests.fake_apex import FusedAdam

    original = accelerators.adam_class
    accelerators.adam_class = (lambda choice: FusedAdam) if apex else original
    try:
        yield
    finally:
        accelerators.adam_class = original


def _fit(recipe_data: dict, steps: int, *, apex: bool, resume: bool = False) -> tuple[list[float], torch.Tensor]:
    """(losses, final weights) of `steps` steps (after resuming the run's latest step if asked); the last step
    is checkpointed."""
    from sedd_scale.distributed import parallel
    from tests.test_trainer import _build

    try:
        with _adam(apex):
            trainer = _build(copy.deepcopy(recipe_data))
            if resume:
                assert trainer.resume()
            losses = trainer.fit(max_steps=steps).losses
        weights = torch.cat([p.detach().flatten().clone() for p in trainer.engine.module.parameters()])
        return losses, weights
    finally:
        parallel.destroy_parallel()


def runs(tmp: str) -> dict:
    """Every run of the test in one process (a world of one)."""
    from sedd_scale.apps import convert

    out = {"reference": _fit(recipe_dict(f"{tmp}/reference", zero_stage=1), 4, apex=False)}
    for name, zero, first in (("apex-torch", 1, True), ("torch-apex", 0, False)):
        recipe = recipe_dict(f"{tmp}/{name}", zero_stage=zero)
        losses, _ = _fit(recipe, 2, apex=first)
        more, weights = _fit(recipe, 2, apex=not first, resume=True)
        out[name] = (losses + more, weights)
    summary = convert.reshard(f"{tmp}/apex-torch/step_000000002", f"{tmp}/resharded", tp=1, pp=1, dp=1, zero_stage=0)
    assert summary["exact"] and summary["step"] == 2
    recipe = recipe_dict(f"{tmp}/resharded", zero_stage=0)
    losses, weights = _fit(recipe, 2, apex=True, resume=True)
    out["resharded-apex"] = (out["apex-torch"][0][:2] + losses, weights)
    return out


def test_apex_and_torch_adamw_resume_each_other(tmp_path):
    from sedd_scale.checkpoint import offline

    out = launch(runs, 1, str(tmp_path))[0]
    losses, weights = out.pop("reference")
    for name, (got_losses, got_weights) in out.items():
        torch.testing.assert_close(torch.tensor(got_losses), torch.tensor(losses), rtol=LOSS_RTOL, atol=0,
                                   msg=lambda m, n=name: f"{n}: {m}")
        torch.testing.assert_close(got_weights, weights, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")

    # Each checkpoint says its optimizer state's layout: apex's under ZeRO-1, torch's without ZeRO.
    zero1 = torch.load(tmp_path / "apex-torch" / "step_000000002" / ds_files.optim_states(0, 0), weights_only=False)
    no_zero = torch.load(tmp_path / "torch-apex" / "step_000000002" / ds_files.model_states(0), weights_only=False)
    assert zero1["optimizer_state_dict"]["base_optimizer_state"][optim_state.LAYOUT_KEY] == optim_state.APEX
    assert no_zero["optimizer"][optim_state.LAYOUT_KEY] == optim_state.TORCH

    # The apex checkpoint (ZeRO-1 files) and the torch one (no ZeRO) after the same 2 steps read alike.
    apex = offline.read_state(tmp_path / "apex-torch" / "step_000000002")
    plain = offline.read_state(tmp_path / "torch-apex" / "step_000000002")
    assert apex.counters["optimizer_step"] == plain.counters["optimizer_step"] == 2
    for category in ("weights", "exp_avg", "exp_avg_sq"):
        for key, tensor in plain.tensors[category].items():
            torch.testing.assert_close(apex.tensors[category][key], tensor, rtol=1e-4, atol=1e-7)
