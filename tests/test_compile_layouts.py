"""model.compile under every kind of layout, through the trainer: TP, PP (with activation checkpointing), ZeRO-2/3
with data parallelism. The compiled regions hold no collective, no parameter hook and no RNG, so each layout's
losses equal the eager single-process run's within the layouts' own tolerance (tests/test_trainer.py). Under PP the
stages compile their regions before the first step (the runner's warm-up): the training steps compile nothing."""
from __future__ import annotations

import copy

import pytest
import torch

from tests.dist import launch
from tests.test_trainer import LOSS_RTOL, STEPS, _build, _run, recipe_dict

pytestmark = pytest.mark.slow  # our compiled regions; the TP/PP layouts under megatron-core 0.19: test_trainer

# pp2 (the 1.3B recipe's: no checkpointing) runs the compiled backwards inside DeepSpeed's pipeline backward, which
# retains the graph between a stage's two outputs; with checkpointing they run inside the recomputation.
LAYOUTS = {"pp2": ({}, {"pp": 2, "zero_stage": 1}),
           "pp2-checkpointing": ({"activation_checkpointing": True}, {"pp": 2, "zero_stage": 1}),
           "tp2": ({}, {"tp": 2}),
           "dp2-zero2-checkpointing": ({"activation_checkpointing": True}, {"zero_stage": 2}),
           "dp2-zero3": ({}, {"zero_stage": 3})}


def _compiled(tmp: str, name: str, model: dict, par: dict) -> dict:
    data = recipe_dict(f"{tmp}/{name}", **par)
    data["model"] = {**copy.deepcopy(data["model"]), "compile": True, **model}
    return data


def eager_reference(tmp: str) -> list[float]:
    return _run(recipe_dict(tmp + "/eager"), STEPS)


def _losses_and_compiles(recipe_data: dict) -> tuple[list[float], int]:
    """The training losses, and the graphs compiled during the steps (after the trainer and its warm-up were built)."""
    from sedd_scale import compiled
    from sedd_scale.distributed import parallel

    try:
        trainer = _build(recipe_data)
        before = compiled.compilations()
        losses = trainer.fit(max_steps=STEPS).losses
        return losses, compiled.compilations() - before
    finally:
        parallel.destroy_parallel()


def compiled_runs(tmp: str) -> dict:
    # The pipelines run first in the process (pp2 with nothing compiled yet, pp2-checkpointing adding the
    # recomputation's graphs): their warm-ups must compile all that their steps run.
    runs = {}
    for name in ("pp2", "pp2-checkpointing"):
        runs[name], runs[f"{name} compiles in training"] = _losses_and_compiles(_compiled(tmp, name, *LAYOUTS[name]))
    for name, spec in LAYOUTS.items():
        if name not in runs:
            runs[name] = _run(_compiled(tmp, name, *spec), STEPS)
    return runs


def test_compiled_layouts_match_the_eager_single_process(tmp_path):
    reference = launch(eager_reference, 1, str(tmp_path))[0]
    runs = launch(compiled_runs, 2, str(tmp_path), timeout=1200)
    for name in ("pp2", "pp2-checkpointing"):  # both stages compiled everything ahead
        assert [r[f"{name} compiles in training"] for r in runs] == [0, 0], name
    for name in LAYOUTS:
        assert runs[0][name] == runs[1][name], f"{name}: ranks disagree"
        torch.testing.assert_close(torch.tensor(runs[0][name][:STEPS]), torch.tensor(reference[:STEPS]), rtol=LOSS_RTOL,
                                   atol=0, msg=lambda m, n=name: f"{n}: {m}")
