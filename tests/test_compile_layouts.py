"""model.compile under every kind of layout, through the trainer: TP, PP (with activation checkpointing), ZeRO-2/3
with data parallelism. The compiled regions hold no collective, no parameter hook and no RNG, so each layout's
losses equal the eager single-process run's within the layouts' own tolerance (tests/test_trainer.py)."""
from __future__ import annotations

import copy

import pytest
import torch

from tests.dist import launch
from tests.test_trainer import LOSS_RTOL, STEPS, _run, recipe_dict

pytestmark = pytest.mark.slow  # our compiled regions; the TP/PP layouts under megatron-core 0.19: test_trainer

LAYOUTS = {"tp2": ({}, {"tp": 2}),
           "pp2-checkpointing": ({"activation_checkpointing": True}, {"pp": 2, "zero_stage": 1}),
           "dp2-zero2-checkpointing": ({"activation_checkpointing": True}, {"zero_stage": 2}),
           "dp2-zero3": ({}, {"zero_stage": 3})}


def _compiled(tmp: str, name: str, model: dict, par: dict) -> dict:
    data = recipe_dict(f"{tmp}/{name}", **par)
    data["model"] = {**copy.deepcopy(data["model"]), "compile": True, **model}
    return data


def eager_reference(tmp: str) -> list[float]:
    return _run(recipe_dict(tmp + "/eager"), STEPS)


def compiled_runs(tmp: str) -> dict:
    return {name: _run(_compiled(tmp, name, *spec), STEPS) for name, spec in LAYOUTS.items()}


def test_compiled_layouts_match_the_eager_single_process(tmp_path):
    reference = launch(eager_reference, 1, str(tmp_path))[0]
    runs = launch(compiled_runs, 2, str(tmp_path), timeout=1200)
    for name in LAYOUTS:
        assert runs[0][name] == runs[1][name], f"{name}: ranks disagree"
        torch.testing.assert_close(torch.tensor(runs[0][name][:STEPS]), torch.tensor(reference[:STEPS]), rtol=LOSS_RTOL,
                                   atol=0, msg=lambda m, n=name: f"{n}: {m}")
