"""Checking an exported directory's checksums costs one rank's reads, not every rank's: rank 0 hashes the files and
every rank raises its verdict (`checksums.once`); and opening a directory reads its tensors' shapes from the
headers, not the tensors."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from sedd_scale.checkpoint import consolidated as cons
from sedd_scale.checkpoint.safetensors_shards import Weights
from tests.dist import launch
from tests.test_convert_formats import tiny_consolidated


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, str]:
    """A consolidated and a hub directory of a tiny model, and a copy of each with a flipped byte in its weights."""
    from sedd_scale.apps import convert

    root = tmp_path_factory.mktemp("exports")
    paths = {"consolidated": tiny_consolidated(root / "consolidated")}
    paths["hub"] = convert.to_hub(paths["consolidated"], root / "hub")
    for name in ("consolidated", "hub"):
        bad = shutil.copytree(paths[name], root / f"{name}-damaged")
        data = bytearray((bad / "model.safetensors").read_bytes())
        data[-5] ^= 0x40  # in the tensor data: the header still parses
        (bad / "model.safetensors").write_bytes(bytes(data))
        paths[f"{name}-damaged"] = bad
    return {k: str(v) for k, v in paths.items()}


def _read_everywhere(paths: dict[str, str]) -> dict:
    """On each rank: read_weights of every directory, counting the bytes this rank hashed and keeping its error."""
    import torch.distributed as dist

    from sedd_scale import checksums
    from sedd_scale.pretrained import read_weights

    real, hashed = checksums.file_record, []

    def counted(path):
        hashed.append(Path(path))
        return real(path)

    checksums.file_record = counted
    out = {}
    try:
        for name, path in paths.items():
            hashed.clear()
            try:
                read_weights(path)
                error = None
            except ValueError as e:
                error = str(e)
            out[name] = {"hashed": sorted(p.name for p in hashed), "bytes": sum(p.stat().st_size for p in hashed),
                         "error": error}
    finally:
        checksums.file_record = real

    if dist.get_rank() == 0:  # not collective unless asked: one rank may open a directory alone
        out["alone"] = cons.open_consolidated(paths["consolidated"]).model.n_blocks

    def fails_on_rank_0() -> None:
        if dist.get_rank() == 0:
            raise OSError("input/output error")

    try:
        checksums.once(fails_on_rank_0)
    except (OSError, RuntimeError) as e:
        out["crash"] = f"{type(e).__name__}: {e}"
    return out


@pytest.mark.slow
def test_only_rank_0_hashes_and_every_rank_raises_its_verdict(exports):
    ranks = launch(_read_everywhere, 2, exports)  # returns: no rank waited for a verdict that never came
    for name in ("consolidated", "hub"):
        files = sorted(p.name for p in Path(exports[name]).rglob("*") if p.is_file() and p.name != "SHA256SUMS")
        zero, one = ranks[0][name], ranks[1][name]
        assert zero["error"] is None and one["error"] is None, (name, zero, one)
        assert set(zero["hashed"]) == set(files), (name, zero["hashed"])  # every listed file, by rank 0
        # rank 1 hashes only config.json (is_consolidated checks it before parsing it: a few KB), no weights
        assert one["hashed"] == ["config.json"], (name, one["hashed"])
        weights = Path(exports[name], "model.safetensors").stat().st_size
        assert one["bytes"] < weights < zero["bytes"], (name, one["bytes"], weights, zero["bytes"])

        damaged = Path(exports[f"{name}-damaged"], "model.safetensors")
        errors = [ranks[r][f"{name}-damaged"]["error"] for r in (0, 1)]
        assert errors[0] == errors[1], errors  # the same error, word for word
        assert f"{damaged} is damaged: its sha256" in errors[0] and "\n" not in errors[0], errors[0]
        assert "model.safetensors" not in ranks[1][f"{name}-damaged"]["hashed"]
    assert ranks[0]["alone"] == 2 and "alone" not in ranks[1]
    assert ranks[0]["crash"] == "OSError: input/output error", ranks[0]["crash"]
    assert ranks[1]["crash"].startswith("RuntimeError: rank 0 could not check the files (OSError: input/output "
                                        "error)"), ranks[1]["crash"]


def test_a_lone_process_checks_as_before(exports, monkeypatch):
    """Without a process group `once` is the check itself: this process hashes every file and raises its error."""
    from sedd_scale import checksums

    hashed = []
    real = checksums.file_record
    monkeypatch.setattr(checksums, "file_record", lambda path: hashed.append(Path(path).name) or real(path))
    cons.open_consolidated(exports["consolidated"])
    assert "model.safetensors" in hashed
    with pytest.raises(cons.ConsolidatedError, match="model.safetensors is damaged: its sha256"):
        cons.open_consolidated(exports["consolidated-damaged"])


def test_opening_reads_shapes_from_headers_not_tensors(exports, monkeypatch):
    """open_consolidated checks every tensor's shape without reading any tensor's data."""
    def refuse(self, key):
        raise AssertionError(f"read {key}")

    monkeypatch.setattr(Weights, "__getitem__", refuse)
    ckpt = cons.open_consolidated(exports["consolidated"], verify=False)
    assert ckpt.model.n_blocks == 2
    shapes = Weights(exports["consolidated"]).shapes()
    assert shapes == cons.expected_shapes(ckpt.model)
