"""Non-finite gradients under every optimizer path: our AdamW called directly (ZeRO-0) or DeepSpeed's ZeRO-1/2 and
bf16 wrappers around it. Each judges the same global gradient norm, skips the update (weights, EMA and LR schedule
stay), and the trainer counts the streak and stops with its message at train.max_nonfinite_steps."""
from __future__ import annotations

import pytest
import torch

from tests.dist import launch
from tests.test_trainer import _build, recipe_dict

pytestmark = pytest.mark.slow  # DeepSpeed's wrappers skipping steps

LAYOUTS = {"zero0": ({}, {}), "zero1": ({}, {"zero_stage": 1}), "zero2": ({}, {"zero_stage": 2}),
           "bf16-zero1": ({"precision": "bf16"}, {"zero_stage": 1})}


def nonfinite_streaks(tmp: str) -> dict:
    from sedd_scale.distributed import parallel

    out = {}
    for name, (model, par) in LAYOUTS.items():
        data = recipe_dict(f"{tmp}/{name}", **par)
        data["model"].update(model)
        trainer = _build(data)
        trainer.fit(max_steps=1)  # one applied step
        weights = [p.detach().clone() for p in trainer.engine.module.parameters()]
        with torch.no_grad():
            next(trainer.engine.module.parameters()).fill_(float("nan"))  # every later gradient is NaN
        try:
            trainer.fit(max_steps=10)
            message = "no error"
        except FloatingPointError as e:
            message = str(e)
        opt = trainer.base_optimizer()
        params = list(trainer.engine.module.parameters())
        out[name] = {"message": message, "skipped": (opt.skipped_total, opt.skipped_in_a_row, opt.last_skipped),
                     "ema_updates": trainer.ema.num_updates, "lr_steps": trainer.engine.lr_scheduler.last_epoch,
                     "unchanged": all(torch.equal(a, b) for a, b in zip(weights[1:], params[1:])),
                     "applied": trainer.engine.was_step_applied()}
        parallel.destroy_parallel()
    return out


def test_nonfinite_gradients_are_skipped_and_counted_under_every_wrapper(tmp_path):
    out = launch(nonfinite_streaks, 1, str(tmp_path))[0]
    for name, r in out.items():
        assert "3 consecutive steps had non-finite losses or gradients (steps 2-4)" in r["message"], (name, r)
        assert r["skipped"] == (3, 3, True), (name, r)
        assert r["ema_updates"] == 1 and r["lr_steps"] == 1, (name, r)  # neither advanced by a skipped step
        assert r["unchanged"] and not r["applied"], (name, r)
