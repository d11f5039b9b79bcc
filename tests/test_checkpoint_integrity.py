"""Checkpoints at cluster scale: replicated state written once, checksums that catch a flipped byte in every
kind of file, offline conversion equal to the live engines' gather, portability between GPU and CPU."""
from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest

from tests.dist import launch
from tests.test_trainer import _build, recipe_dict

pytestmark = pytest.mark.slow


def _train_and_save(recipe_data: dict, steps: int = 2) -> None:
    from sedd_scale.distributed import parallel

    try:
        _build(recipe_data).fit(max_steps=steps)  # ends with a synchronous checkpoint
    finally:
        parallel.destroy_parallel()


def _bytes(step: Path) -> int:
    import json

    return json.loads((step / "meta.json").read_text())["bytes"]


def test_replicated_state_is_written_once(tmp_path):
    """DP2 writes (almost) the bytes of DP1 for the same model and ZeRO stage: the EMA is sharded over DP."""
    sizes = {}
    for dp in (1, 2):
        data = recipe_dict(str(tmp_path / f"dp{dp}"), zero_stage=1)
        data["model"].update(hidden_size=64, n_blocks=4)  # big enough that tensors, not pickles, dominate
        launch(_train_and_save, dp, data)
        sizes[dp] = _bytes(tmp_path / f"dp{dp}" / "step_000000002")
    assert sizes[2] <= 1.05 * sizes[1], sizes  # was 1.21x with an EMA copy per DP rank


def _flip(path: Path, where: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x40
    path.write_bytes(bytes(data))


def _resume_errors(recipe_data: dict, runs: dict[str, str]) -> dict[str, str]:
    """Try to resume each run directory (a damaged copy); the error each gives."""
    from sedd_scale.distributed import parallel
    from sedd_scale.checkpoint.sharded import CheckpointError

    out = {}
    for name, run in runs.items():
        data = copy.deepcopy(recipe_data)
        data["checkpoint"]["dir"] = run
        try:
            _build(data).resume()
            out[name] = "no error"
        except CheckpointError as e:
            out[name] = str(e)
        finally:
            parallel.destroy_parallel()
    return out


def test_a_flipped_byte_in_any_file_is_refused_naming_it(tmp_path):
    from sedd_scale.apps import convert
    from sedd_scale.checkpoint.sharded import CheckpointError
    from sedd_scale.pretrained import read_weights

    source = recipe_dict(str(tmp_path / "a"), pp=2, zero_stage=1)  # layer files, optimizer and model states
    launch(_train_and_save, 2, source)
    step = tmp_path / "a" / "step_000000002"
    kinds = {"layer weights": "deepspeed/layer_01-model_00-model_states.pt",
             "model states": "deepspeed/mp_rank_01_model_states.pt",
             "optimizer states": "deepspeed/zero_pp_rank_0_mp_rank_01_optim_states.pt",
             "ours (EMA, RNG, data position)": "rank_00001.pt"}
    runs = {}
    for kind, rel in kinds.items():
        run = tmp_path / kind.split()[0]
        shutil.copytree(tmp_path / "a", run)
        _flip(run / step.name / rel)
        runs[kind] = str(run)
        with pytest.raises(CheckpointError, match=f"{run / step.name / rel} is damaged.*cannot be converted"):
            convert.consolidate(run, tmp_path / f"out-{kind.split()[0]}", weights="raw", training_state=True)
        assert not (tmp_path / f"out-{kind.split()[0]}").exists()
    errors = launch(_resume_errors, 2, source, runs)
    for kind, rel in kinds.items():
        # the rank that reads the damaged file names it; the other learns of it and stops too
        named = [e[kind] for e in errors if f"{runs[kind]}/{step.name}/{rel} is damaged" in e[kind]]
        told = [e[kind] for e in errors if "another rank could not read its files" in e[kind]]
        assert len(named) == 1 and len(told) == 1, (kind, errors)
        assert "restore the file from a copy" in named[0], named[0]

    # exports: a consolidated directory and a hub directory, each file flipped in a copy
    consolidated, hub = tmp_path / "c", tmp_path / "hub"
    convert.consolidate(tmp_path / "a", consolidated, weights="ema", training_state=True)
    convert.to_hub(consolidated, hub)
    for folder, files in ((consolidated, ["model.safetensors", "training/exp_avg.safetensors",
                                          "training/counters.pt", "config.json"]),
                          (hub, ["model.safetensors", "config.json"])):
        for rel in files:
            copy_ = tmp_path / f"{folder.name}-{rel.replace('/', '-')}"
            shutil.copytree(folder, copy_)
            _flip(copy_ / rel, 0.9 if rel == "config.json" else 0.5)  # in config.json: a value, not the JSON syntax
            with pytest.raises(ValueError, match=f"{copy_ / rel} is damaged"):
                read_weights(copy_)
            if folder is consolidated:
                with pytest.raises(ValueError, match=f"{copy_ / rel} is damaged"):
                    convert.shard(copy_, tmp_path / f"s-{copy_.name}", tp=1)


def _portable(tmp: str) -> dict:
    """Train 2 steps and save as a GPU job would have (storages tagged cuda:0, CUDA RNG states), resume on CPU."""
    import torch.serialization

    from sedd_scale.distributed import parallel
    from sedd_scale.train import trainer as trainer_module

    losses = _build(recipe_dict(tmp + "-reference")).fit(max_steps=4).losses
    parallel.destroy_parallel()
    data = recipe_dict(tmp)

    real_tag, real_rng = torch.serialization.location_tag, trainer_module._rng_state
    torch.serialization.location_tag = lambda storage: "cuda:0"

    def gpu_rng() -> dict:  # what a CUDA run records: 16-byte philox states for the tracker and the device
        state = real_rng()
        return {**state, "device": "cuda", "cuda": torch.zeros(16, dtype=torch.uint8),
                "tracker": {name: torch.zeros(16, dtype=torch.uint8) for name in state["tracker"]}}

    trainer_module._rng_state = gpu_rng
    try:
        first = _build(data).fit(max_steps=2).losses
    finally:
        torch.serialization.location_tag, trainer_module._rng_state = real_tag, real_rng
        parallel.destroy_parallel()
    resumed = _build(data)
    assert resumed.resume() and resumed.step == 2
    out = {"reference": losses, "interrupted": first + resumed.fit(max_steps=2).losses, "notes": resumed.notes}
    parallel.destroy_parallel()
    return out


def test_a_gpu_written_checkpoint_resumes_and_converts_on_cpu(tmp_path):
    from sedd_scale.apps import convert

    out = launch(_portable, 1, str(tmp_path / "run"))[0]
    assert out["interrupted"] == out["reference"], out  # dropout is off: the tracker's reseeding changes nothing
    assert any("written on cuda and this run is on cpu" in n and "reseeded" in n for n in out["notes"]), out["notes"]
    summary = convert.consolidate(tmp_path / "run", tmp_path / "ema", weights="ema")
    assert summary["step"] == 4 and (tmp_path / "ema" / "model.safetensors").is_file()


def _train_and_gather(cases: dict[str, dict]) -> dict:
    """For each layout: train 2 steps and save, then a fresh engine loads the step and gathers its whole state."""
    from sedd_scale.apps import convert
    from sedd_scale.distributed import parallel
    from sedd_scale.checkpoint import full_state
    from sedd_scale.checkpoint.sharded import read_meta

    out = {}
    for name, data in cases.items():
        _train_and_save(data)
        step = Path(data["checkpoint"]["dir"]) / "step_000000002"
        meta = read_meta(step)
        trainer = convert.build_trainer({**meta["recipe"], "checkpoint": {"dir": str(step.parent), "resume": False}})
        trainer.load(step)
        out[name] = full_state.gather(trainer)
        parallel.destroy_parallel()
    return out


def _case(tmp_path, name: str, model: dict | None = None, **layout) -> dict:
    data = recipe_dict(str(tmp_path / name), **layout)
    data["model"].update(model or {})
    return data


def _check_offline(tmp_path, live: dict) -> None:
    from sedd_scale.checkpoint import full_state, offline

    for name, state in live.items():
        read = offline.read_state(tmp_path / name / "step_000000002")
        assert full_state.differences(read, state) == [], name
        assert read.counters["step"] == 2 and read.counters["optimizer_step"] == 2, name


def test_offline_read_equals_the_live_engines_gather(tmp_path):
    """Reading the files in one process gives the state the saved world's engines gather, bit for bit: DP2 under
    ZeRO-0/2/3 and DeepSpeed's bf16 optimizer."""
    cases = {"dp2-zero0": _case(tmp_path, "dp2-zero0", zero_stage=0),
             "dp2-zero2": _case(tmp_path, "dp2-zero2", zero_stage=2),
             "dp2-zero3": _case(tmp_path, "dp2-zero3", zero_stage=3),
             "dp2-bf16": _case(tmp_path, "dp2-bf16", {"precision": "bf16"}, zero_stage=1)}
    _check_offline(tmp_path, launch(_train_and_gather, 2, cases)[0])


@pytest.mark.megatron  # TP slices as megatron-core lays them out
def test_offline_read_of_a_world_of_eight_equals_the_live_gather(tmp_path):
    """TP2 x PP2 x DP2 on 8 ranks (ZeRO-1 partitions, pipeline layer files, TP slices), read in one process."""
    cases = {"tp2-pp2-dp2": _case(tmp_path, "tp2-pp2-dp2", tp=2, pp=2, zero_stage=1)}
    _check_offline(tmp_path, launch(_train_and_gather, 8, cases)[0])
