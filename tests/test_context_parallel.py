"""Context parallelism with real processes: CP 2 trains with one process's losses, gradient norms and weights (ZeRO
partitions and gradient averaging over DP x CP), resumes its own checkpoint exactly, and a checkpoint moves between
CP sizes through `convert_checkpoint.py reshard` with the losses of the uninterrupted run."""
from __future__ import annotations

import json
import math

import pytest
import torch

from tests.dist import launch
from tests.test_convert import _trainer
from tests.test_trainer import LOSS_RTOL, recipe_dict

pytestmark = [pytest.mark.slow, pytest.mark.megatron]

STEPS = 4
SAVE_AT = 2
NORM_RTOL = 1e-4  # the gradient norms: sums of squares in other orders, of gradients summed over other splits
WEIGHT_ATOL = 1e-4  # after Adam steps: last-bit gradient differences become tiny weight differences (test_trainer)


def measured(recipe_data: dict, save_at: int | None = None, resume: bool = False, steps: int = STEPS) -> dict:
    """Train (resuming first if asked; saving after `save_at` steps): the losses, the gradient norms and, on global
    rank 0, the whole fp32 weights afterwards; ranks that hold no whole state return weights None."""
    import torch.distributed as dist

    from sedd_scale.checkpoint import full_state
    from sedd_scale.distributed import parallel

    try:
        trainer = _trainer(recipe_data)
        if resume:
            assert trainer.resume(), "no checkpoint to resume from"
        losses, norms = [], []
        while trainer.step < steps:
            losses.append(trainer.train_step())
            norms.append(float(trainer.engine.get_global_grad_norm()))
            if trainer.step == save_at:
                trainer.save(sync=True)
        state = full_state.gather(trainer)
        weights = None if state is None else {k: v.clone() for k, v in state.tensors["weights"].items()}
        return {"losses": losses, "norms": norms, "weights": weights, "rank": dist.get_rank(),
                "layout": trainer.layout.describe()}
    finally:
        parallel.destroy_parallel()


def _close(name: str, got: dict, want: dict, offset: int = 0) -> None:
    """`got`'s losses and gradient norms are `want`'s from step `offset` on, its weights `want`'s."""
    n = len(got["losses"])
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(want["losses"][offset:offset + n]),
                               rtol=LOSS_RTOL, atol=0, msg=lambda m: f"{name} losses: {m}")
    torch.testing.assert_close(torch.tensor(got["norms"]), torch.tensor(want["norms"][offset:offset + n]),
                               rtol=NORM_RTOL, atol=0, msg=lambda m: f"{name} gradient norms: {m}")
    assert set(got["weights"]) == set(want["weights"]), name
    for key, w in want["weights"].items():
        torch.testing.assert_close(got["weights"][key], w, rtol=0, atol=WEIGHT_ATOL,
                                   msg=lambda m, k=key: f"{name} weight {k}: {m}")


def _reshard(step, out, **layout) -> dict:
    """`convert_checkpoint.py reshard` of `step` to `out` for `layout` (through its command line); the recipe (as
    data) that resumes it."""
    from sedd_scale.cli import convert_checkpoint

    args = [f"--{k.replace('_', '-')}={v}" for k, v in layout.items()]
    assert convert_checkpoint.main(["reshard", str(step), str(out), *args]) == 0
    meta = json.loads((out / f"step_{SAVE_AT:09d}" / "meta.json").read_text())
    assert meta["step"] == SAVE_AT and meta["layout"] == "any", meta["layout"]
    recipe = meta["recipe"]
    assert recipe["parallel"].get("context_parallel", 1) == layout.get("cp", 1)
    return recipe


def cp2_runs(tmp: str, moved: dict) -> dict:
    """World 2 = CP 2: ZeRO-1 (saved, then resumed in its own layout), ZeRO-3, and the CP 1 checkpoint `moved`."""
    out = {"cp2-zero1": measured(recipe_dict(f"{tmp}/cp2", zero_stage=1, context_parallel=2), SAVE_AT),
           "cp2-zero3": measured(recipe_dict(f"{tmp}/cp2-zero3", zero_stage=3, context_parallel=2))}
    out["cp2-resume"] = measured(recipe_dict(f"{tmp}/cp2", zero_stage=1, context_parallel=2), resume=True)
    out["cp1-to-cp2"] = measured(moved, resume=True)
    return out


def test_context_parallel_matches_one_process_and_moves_between_cp_sizes(tmp_path):
    # one process, CP 1 (saved after SAVE_AT steps: the source of the CP 1 -> CP 2 move)
    reference = launch(measured, 1, recipe_dict(str(tmp_path / "cp1"), zero_stage=1), SAVE_AT)[0]
    assert len(reference["losses"]) == STEPS and all(math.isfinite(v) for v in reference["losses"])
    to_cp2 = _reshard(tmp_path / "cp1" / f"step_{SAVE_AT:09d}", tmp_path / "cp1-to-cp2", tp=1, cp=2, dp=1,
                      zero_stage=1)
    two = launch(cp2_runs, 2, str(tmp_path), to_cp2)
    for name in two[0]:
        assert two[0][name]["losses"] == two[1][name]["losses"], f"{name}: CP ranks disagree"
        assert two[1][name]["weights"] is None  # the whole state is gathered on global rank 0 only
    assert two[0]["cp2-zero1"]["layout"].startswith("world 2 = TP 1 x CP 2 x PP 1 x DP 1 | ZeRO-1 over DP x CP 2")
    for name in ("cp2-zero1", "cp2-zero3"):
        _close(name, two[0][name], reference)
    # its own checkpoint: exactly the uninterrupted run
    resumed, whole = two[0]["cp2-resume"], two[0]["cp2-zero1"]
    assert resumed["losses"] == whole["losses"][SAVE_AT:] and resumed["norms"] == whole["norms"][SAVE_AT:]
    _close("cp1-to-cp2", two[0]["cp1-to-cp2"], reference, SAVE_AT)
    # the CP 2 checkpoint, moved to one process
    to_cp1 = _reshard(tmp_path / "cp2" / f"step_{SAVE_AT:09d}", tmp_path / "cp2-to-cp1", tp=1, cp=1, dp=1,
                      zero_stage=1)
    _close("cp2-to-cp1", launch(measured, 1, to_cp1, None, True)[0], whole, SAVE_AT)
