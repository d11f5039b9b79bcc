"""Checkpoints at cluster scale: replicated state written once, checksums that catch a flipped byte in every
kind of file, offline conversion equal to the live engines' gather, portability between GPU and CPU."""
from __future__ import annotations

import shutil
from contextlib import contextmanager
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


# ---------------------------------------------------------------------------------------------
# A flipped byte anywhere, in any file of any format, is refused naming the file. The checksums are checked
# before a file is parsed, so where a flip lands (a JSON value or its syntax, a tensor or a header) and how
# long the temporary paths are (they are in config.json and meta.json) change nothing.
def _positions(path: Path) -> list[int]:
    """The bytes flipped in `path`: the first two, seven spread over the file, the last two."""
    n = path.stat().st_size
    return sorted({0, 1, *(n * k // 8 for k in range(1, 8)), n - 2, n - 1})


@contextmanager
def _flipped(path: Path, where: int):
    """`path` with the byte at `where` flipped (one bit, 0x40: ASCII stays ASCII) for the block, restored after."""
    original = path.read_bytes()
    data = bytearray(original)
    data[where] ^= 0x40
    path.write_bytes(bytes(data))
    try:
        yield
    finally:
        path.write_bytes(original)


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def _named(error: BaseException, path: Path) -> bool:
    """Whether an error names `path` as damaged or (a damaged SHA256SUMS: a listed name changed) the listing."""
    text = str(error)
    return f"{path} is damaged" in text or (path.name == "SHA256SUMS" and f"{path} lists it" in text)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    """One trained checkpoint (PP2, ZeRO-1: layer files, model and optimizer states, ours) and what the conversion
    tools make of it: a consolidated directory with training state, a hub directory, a layout-free run."""
    from sedd_scale.apps import convert

    root = tmp_path_factory.mktemp("integrity")
    recipe = recipe_dict(str(root / "run"), pp=2, zero_stage=1)
    launch(_train_and_save, 2, recipe)
    convert.consolidate(root / "run", root / "consolidated", weights="ema", training_state=True)
    convert.to_hub(root / "consolidated", root / "hub")
    convert.reshard(root / "run", root / "resharded")
    return {"recipe": recipe, "run": root / "run", "step": root / "run" / "step_000000002",
            "consolidated": root / "consolidated", "hub": root / "hub", "resharded": root / "resharded"}


def test_every_file_of_a_step_is_listed_and_meta_json_is_checked_too(saved):
    step = saved["step"]
    listed = [line.split("  ", 1)[1] for line in (step / "SHA256SUMS").read_text().splitlines()]
    assert listed == [f for f in _files(step) if f != "SHA256SUMS"] and "meta.json" in listed, listed
    kinds = ["deepspeed/layer_01-model_00-model_states.pt", "deepspeed/mp_rank_01_model_states.pt",
             "deepspeed/zero_pp_rank_0_mp_rank_01_optim_states.pt", "rank_00001.pt", "zero_to_fp32.py"]
    assert set(kinds) <= set(listed), listed


def test_a_flipped_byte_in_a_training_checkpoint_stops_its_conversion_naming_the_file(saved, tmp_path):
    """Every file of a step (meta.json and SHA256SUMS included) and of a layout-free one, and the `latest` pointer."""
    from sedd_scale.apps import convert
    from sedd_scale.checkpoint.sharded import CheckpointError

    for run in (saved["run"], saved["resharded"]):
        step = run / "step_000000002"
        for path in [run / "latest"] + [step / rel for rel in _files(step)]:
            for where in _positions(path):
                with _flipped(path, where), pytest.raises((CheckpointError, ValueError)) as e:
                    convert.consolidate(run, tmp_path / "out", weights="raw", training_state=True)
                if path.name == "latest":  # the pointer names a step that is not there
                    assert f"{path} names" in str(e.value) and "missing" in str(e.value), (where, str(e.value))
                else:
                    assert _named(e.value, path), (path, where, str(e.value))
                if run == saved["run"] and path.suffix == ".pt":
                    assert "cannot be converted" in str(e.value), (path, where, str(e.value))
                assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())  # nothing half-written
    convert.consolidate(saved["run"], tmp_path / "out", weights="raw")  # all restored: it converts


def _resume_errors(recipe_data: dict, steps: dict[str, str]) -> dict[str, str]:
    """One trainer loads each step folder in turn (damaged copies); the error each gives, then the intact one."""
    from sedd_scale.checkpoint.sharded import CheckpointError
    from sedd_scale.distributed import parallel

    out = {}
    try:
        trainer = _build(recipe_data)
        for name, step in steps.items():
            try:
                trainer.load(Path(step))
                out[name] = "no error"
            except CheckpointError as e:
                out[name] = str(e)
        trainer.load(Path(recipe_data["checkpoint"]["dir"]) / "step_000000002")
        out["intact"] = trainer.step
    finally:
        parallel.destroy_parallel()
    return out


def test_a_flipped_byte_in_any_file_a_resume_reads_is_refused_naming_it(saved, tmp_path):
    """Damaged copies of the step (the files a resume reads: not DeepSpeed's helper scripts) and of a layout-free
    step, each byte flipped at its start, middle and end; every rank stops, one at least naming the file."""
    steps, damaged = {}, {}
    for source in (saved["step"], saved["resharded"] / "step_000000002"):
        for rel in _files(source):
            if rel.endswith(".py"):
                continue
            n = (source / rel).stat().st_size
            for where in (0, n // 2, n - 1):
                name = f"{source.parent.name}-{rel.replace('/', '-')}-{where}"
                copy_ = tmp_path / name / source.name
                shutil.copytree(source, copy_)
                data = bytearray((copy_ / rel).read_bytes())
                data[where] ^= 0x40
                (copy_ / rel).write_bytes(bytes(data))
                steps[name], damaged[name] = str(copy_), copy_ / rel
    errors = launch(_resume_errors, 2, saved["recipe"], steps)
    assert [e["intact"] for e in errors] == [2, 2], errors  # nothing was left half-loaded
    for name, path in damaged.items():
        named = [e[name] for e in errors if _named(e[name], path)]
        told = [e[name] for e in errors if "another rank could not read its files" in e[name]]
        assert named and len(named) + len(told) == 2, (name, [e[name] for e in errors])
        if path.suffix == ".pt" and "resharded" not in name:
            assert "restore the file from a copy" in named[0], named[0]


def test_a_flipped_byte_in_any_file_of_an_export_is_refused_naming_it(saved, tmp_path):
    """Consolidated and hub directories: every file (config.json, SHA256SUMS, tensors, counters) at every position,
    through every reader: load_pretrained's, evaluation's and sampling's, and each conversion's."""
    from sedd_scale.apps import convert
    from sedd_scale.apps.generation import read_model_config
    from sedd_scale.pretrained import read_weights

    readers = {"read_weights": read_weights, "read_model_config": read_model_config,
               "describe": convert.describe}
    consolidated_only = {"shard": lambda p: convert.shard(p, tmp_path / "out", tp=1),
                         "to_hub": lambda p: convert.to_hub(p, tmp_path / "out")}
    hub_only = {"from_hub": lambda p: convert.from_hub(p, tmp_path / "out")}
    for folder, extra in ((saved["consolidated"], consolidated_only), (saved["hub"], hub_only)):
        assert {"SHA256SUMS", "config.json", "model.safetensors"} <= set(_files(folder)), _files(folder)
        for rel in _files(folder):
            path = folder / rel
            for where in _positions(path):
                with _flipped(path, where):
                    for reader, read in {**readers, **extra}.items():
                        if folder == saved["hub"] and reader in ("read_model_config", "describe") and \
                                rel not in ("config.json", "SHA256SUMS"):
                            continue  # of a hub directory, they read config.json only (checked first)
                        with pytest.raises(ValueError) as e:
                            read(folder)
                        assert _named(e.value, path), (reader, rel, where, str(e.value))
                        assert not (tmp_path / "out").exists(), reader


def test_conversions_create_missing_parent_folders_of_their_outputs(saved, tmp_path):
    from sedd_scale.apps import convert

    deep = tmp_path / "a" / "b"
    assert convert.consolidate(saved["run"], deep / "ema", weights="ema")["out"] == str(deep / "ema")
    assert convert.reshard(saved["run"], deep / "c" / "run")["out"] == str(deep / "c" / "run")
    assert (deep / "ema" / "model.safetensors").is_file() and (deep / "c" / "run" / "latest").is_file()


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
    from sedd_scale.checkpoint import full_state
    from sedd_scale.checkpoint.sharded import read_meta
    from sedd_scale.distributed import parallel

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
    ZeRO-0/2/3 and DeepSpeed's bf16 optimizer, and CP2 under ZeRO-3 (partitions and EMA shards over DP x CP)."""
    cases = {"dp2-zero0": _case(tmp_path, "dp2-zero0", zero_stage=0),
             "dp2-zero2": _case(tmp_path, "dp2-zero2", zero_stage=2),
             "dp2-zero3": _case(tmp_path, "dp2-zero3", zero_stage=3),
             "dp2-bf16": _case(tmp_path, "dp2-bf16", {"precision": "bf16"}, zero_stage=1),
             "cp2-zero3": _case(tmp_path, "cp2-zero3", zero_stage=3, context_parallel=2)}
    _check_offline(tmp_path, launch(_train_and_gather, 2, cases)[0])


@pytest.mark.megatron  # TP slices as megatron-core lays them out
def test_offline_read_of_a_world_of_eight_equals_the_live_gather(tmp_path):
    """TP2 x PP2 x DP2 on 8 ranks (ZeRO-1 partitions, pipeline layer files, TP slices), read in one process."""
    cases = {"tp2-pp2-dp2": _case(tmp_path, "tp2-pp2-dp2", tp=2, pp=2, zero_stage=1)}
    _check_offline(tmp_path, launch(_train_and_gather, 8, cases)[0])
