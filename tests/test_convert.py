"""Checkpoint conversion with real processes: consolidation, resharding that resumes with the same
losses, and the TP2 x PP2 -> consolidated -> TP4 -> hub -> back round trip with identical outputs."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from sedd_scale.testing.synthetic import SyntheticTokens
from tests.dist import launch
from tests.test_trainer import LOSS_RTOL, recipe_dict

pytestmark = pytest.mark.slow


def _trainer(recipe_data: dict):
    import sedd_scale.compat  # noqa: F401  (before megatron-core / DeepSpeed)

    from megatron.core import parallel_state as ps

    from sedd_scale.config import Recipe, from_dict
    from sedd_scale.distributed import engine  # first: it applies sedd_scale.compat before megatron loads
    from sedd_scale.train.trainer import Trainer

    recipe = from_dict(Recipe, copy.deepcopy(recipe_data))
    layout, topology = engine.setup(recipe)
    data = SyntheticTokens(recipe.model.num_tokens, recipe.data.seq_len, layout, ps.get_data_parallel_rank())
    return Trainer(recipe, layout, topology, loader=data)


def train(recipe_data: dict, steps: int, save_at: int | None = None, resume: bool = False) -> list[float]:
    """Train `steps` more steps (resuming from the run's latest checkpoint if asked), saving after `save_at`."""
    from sedd_scale.distributed import parallel

    try:
        trainer = _trainer(recipe_data)
        if resume:
            assert trainer.resume(), "no checkpoint to resume from"
        losses = []
        if save_at is not None:
            losses += trainer.fit(max_steps=save_at).losses
            trainer.save()
        return losses + trainer.fit(max_steps=steps - len(losses)).losses
    finally:
        parallel.destroy_parallel()


def start_and_save(recipe_data: dict) -> None:
    """Resume the run (a layout-free step) under the recipe's layout and save it in that layout at once."""
    from sedd_scale.distributed import parallel

    try:
        trainer = _trainer(recipe_data)
        assert trainer.resume()
        trainer.save(sync=True)
    finally:
        parallel.destroy_parallel()


def log_scores(path: str, tp: int) -> torch.Tensor:
    """Full-vocabulary log-scores of a fixed batch from a consolidated or hub directory at TP = tp."""
    from sedd_scale.distributed import parallel
    from sedd_scale.pretrained import load_pretrained

    try:
        model, _, _ = load_pretrained(path, tp_size=tp, device="cpu")
        gen = torch.Generator().manual_seed(3)
        x = torch.randint(0, 12, (3, 8), generator=gen)
        total = torch.rand(3, generator=gen) * 3
        with torch.no_grad():
            return parallel.gather_tp(model(x, total))[..., :12].clone()
    finally:
        parallel.destroy_parallel()


def test_reshard_resumes_with_the_same_losses(tmp_path):
    from sedd_scale.apps import convert

    source = recipe_dict(str(tmp_path / "a"), tp=2, pp=2, zero_stage=1)
    reference = launch(train, 4, source, 4, 2)[0]  # 4 steps, checkpoint after 2
    targets = {"tp4-zero0": dict(tp=4, pp=1, dp=1, zero_stage=0),
               "dp2-zero3-accum2": dict(tp=1, pp=1, dp=2, zero_stage=3, micro_batch=2),
               "pp2-dp2": dict(tp=1, pp=2, dp=2, zero_stage=1, micro_batch=4)}
    resumed = {}
    for name, layout in targets.items():
        out = tmp_path / name
        summary = convert.reshard(tmp_path / "a" / "step_000000002", out, **layout)
        assert summary["exact"] and summary["step"] == 2 and summary["layout"]["tp"] == layout["tp"]
        meta = json.loads((out / "step_000000002" / "meta.json").read_text())
        assert meta["layout"] == "any" and meta["recipe"]["parallel"]["tp"] == layout["tp"]  # any layout resumes it
        recipe = copy.deepcopy(meta["recipe"])
        recipe["checkpoint"]["dir"] = str(out)
        world = layout["tp"] * layout["pp"] * layout["dp"]
        resumed[name] = launch(train, world, recipe, 2, None, True)[0]
    for name, losses in resumed.items():
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference[2:]), rtol=LOSS_RTOL, atol=0,
                                   msg=lambda m, n=name: f"{n}: {m}")
    print("reference losses", reference, "resumed", resumed)


@pytest.mark.megatron  # megatron's parameter names and TP splits: rerun under megatron-core 0.19
def test_round_trip_tp2pp2_consolidated_tp4_hub_and_back(tmp_path):
    from sedd_scale.apps import convert
    from sedd_scale.checkpoint import consolidated

    source = recipe_dict(str(tmp_path / "a"), tp=2, pp=2, zero_stage=1)
    launch(train, 4, source, 2)
    first = tmp_path / "first"
    convert.consolidate(tmp_path / "a", first, weights="ema")
    shard = convert.shard(first, tmp_path / "tp4", tp=4, pp=1, dp=1, zero_stage=1)  # weights only: a fresh start
    recipe = json.loads((tmp_path / "tp4" / "step_000000000" / "meta.json").read_text())["recipe"]
    launch(start_and_save, 4, recipe)  # a TP4 run starts from the weights and writes its own layout's step 0
    assert shard["step"] == 0 and json.loads((tmp_path / "tp4" / "step_000000000" / "meta.json").read_text())[
        "layout"] == {"tp": 4, "pp": 1, "dp": 1, "zero_stage": 1}
    second = tmp_path / "second"
    convert.consolidate(tmp_path / "tp4", second, weights="raw")
    convert.to_hub(second, tmp_path / "hub")
    back = tmp_path / "back"
    convert.from_hub(tmp_path / "hub", back, vocab_multiple=1)
    a, b = consolidated.open_consolidated(first), consolidated.open_consolidated(back)
    assert set(a.weights()) == set(b.weights())
    for key in a.weights():
        assert torch.equal(a.weights()[key], b.weights()[key]), key
    original = launch(log_scores, 1, str(first), 1)[0]
    assert torch.equal(launch(log_scores, 1, str(back), 1)[0], original)
    assert torch.equal(launch(log_scores, 1, str(tmp_path / "hub"), 1)[0], original)
    tp4 = launch(log_scores, 4, str(back), 4)
    assert all(torch.equal(t, tp4[0]) for t in tp4)
    torch.testing.assert_close(tp4[0], original, rtol=1e-5, atol=1e-5)  # other reduction orders only


def test_bf16_reshard_carries_fp32_masters(tmp_path):
    """bf16 weights with fp32 masters (DeepSpeed's bf16 optimizer, ZeRO-1, DP2) -> TP2 ZeRO-2: the tool's own
    verification compares the fp32 masters and moments bitwise; the losses then agree to bf16 rounding."""
    from sedd_scale.apps import convert

    source = recipe_dict(str(tmp_path / "a"), zero_stage=1)
    source["model"]["precision"] = "bf16"
    reference = launch(train, 2, source, 4, 2)[0]
    summary = convert.reshard(tmp_path / "a" / "step_000000002", tmp_path / "b", tp=2, pp=1, dp=1, zero_stage=2)
    assert summary["exact"] and summary["layout"]["zero_stage"] == 2
    recipe = json.loads((tmp_path / "b" / "step_000000002" / "meta.json").read_text())["recipe"]
    resumed = launch(train, 2, recipe, 2, None, True)[0]
    # bf16 activations under another TP split round differently (measured 1.1e-5 relative).
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(reference[2:]), rtol=1e-4, atol=0)
