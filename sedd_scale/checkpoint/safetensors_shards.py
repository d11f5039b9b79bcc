"""Model weights as one safetensors file, or as shards with an index (the Hugging Face convention).

Above `max_shard_bytes` the weights are split, in key order, into `model-00001-of-0000N.safetensors`, ... and
`model.safetensors.index.json` maps each key to its file:

    {"metadata": {"total_size": <bytes of tensor data>}, "weight_map": {"<key>": "model-00001-of-00003.safetensors"}}

as `transformers`' `save_pretrained(max_shard_size=...)` writes it, so hub tooling (and `safetensors` itself, one
shard at a time) reads our exports. A tensor larger than the limit gets a shard of its own. Readers open either
form lazily, a tensor per lookup, so a rank of a TP group reads only its keys.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from safetensors import SafetensorError, safe_open
from torch import Tensor

from sedd_scale.checkpoint.safetensors_writer import save_tensors

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = WEIGHTS_FILE + ".index.json"
DEFAULT_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size ("5GB")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30, "TIB": 2**40}


class WeightsError(ValueError):
    """Weights files that are missing, damaged, or disagree with their index."""


def parse_size(text: str | int) -> int:
    """Bytes of a size written as 5GB, 500MB, 2GiB or a plain number of bytes."""
    if isinstance(text, int):
        size = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(text), flags=re.IGNORECASE)
        if not m:
            raise ValueError(f"size {text!r}: write a number of bytes or one with a unit (500MB, 5GB, 2GiB)")
        size = int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])
    if size < 1:
        raise ValueError(f"size {text!r} must be at least one byte")
    return size


def nbytes(t: Tensor) -> int:
    """Bytes of a tensor's data."""
    return t.numel() * t.element_size()


def plan_shards(tensors: Mapping[str, Tensor], max_shard_bytes: int) -> list[list[str]]:
    """Keys grouped into shards of at most `max_shard_bytes` each, in key order (an oversized tensor alone)."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, t in tensors.items():
        if shards[-1] and size + nbytes(t) > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes(t)
    return shards


def write_weights(tensors: Mapping[str, Tensor], folder: str | Path, *, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                  written: Callable[[int], object] | None = None) -> list[str]:
    """Write `tensors` into `folder` as model.safetensors, or as shards plus the index; the file names written
    (`written`: told each tensor's bytes, as `save_tensors`)."""
    folder = Path(folder)
    groups = plan_shards(tensors, max_shard_bytes)
    if len(groups) == 1:
        save_tensors(dict(tensors), folder / WEIGHTS_FILE, written)
        return [WEIGHTS_FILE]
    names = [f"model-{i:05d}-of-{len(groups):05d}.safetensors" for i in range(1, len(groups) + 1)]
    for name, keys in zip(names, groups):
        save_tensors({k: tensors[k] for k in keys}, folder / name, written)
    index = {"metadata": {"total_size": sum(nbytes(t) for t in tensors.values())},
             "weight_map": {k: name for name, keys in zip(names, groups) for k in keys}}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return names + [INDEX_FILE]


def has_weights(folder: str | Path) -> bool:
    """Whether `folder` holds model weights in either form."""
    folder = Path(folder)
    return (folder / WEIGHTS_FILE).is_file() or (folder / INDEX_FILE).is_file()


def weight_files(folder: str | Path) -> list[str]:
    """The weights' file names in `folder` (the index first when sharded); WeightsError when absent or ambiguous."""
    folder = Path(folder)
    single, index = (folder / WEIGHTS_FILE).is_file(), (folder / INDEX_FILE).is_file()
    if single and index:
        raise WeightsError(f"{folder} holds both {WEIGHTS_FILE} and {INDEX_FILE}: keep the one that was exported "
                           "and delete the other")
    if single:
        return [WEIGHTS_FILE]
    if not index:
        raise WeightsError(f"{folder} has no model weights ({WEIGHTS_FILE} or {INDEX_FILE})")
    return [INDEX_FILE] + sorted(set(_read_index(folder).values()))


def _read_index(folder: Path) -> dict[str, str]:
    path = folder / INDEX_FILE
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path} is not valid JSON ({e}): the export is damaged; write it again") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) and "/" not in v for v in weight_map.values()):
        raise WeightsError(f"{path} lacks a weight_map of key -> shard file name in this folder: the export is "
                           "damaged; write it again")
    return weight_map


class Weights(Mapping):
    """A folder's model weights (single file or shards) as a read-only mapping that loads a tensor per lookup."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        files = weight_files(self.folder)
        if files == [WEIGHTS_FILE]:
            self._where = {k: WEIGHTS_FILE for k in _keys(self.folder / WEIGHTS_FILE)}
            return
        self._where = _read_index(self.folder)
        for name in files[1:]:
            held = set(_keys(self.folder / name))
            listed = {k for k, v in self._where.items() if v == name}
            if held != listed:
                raise WeightsError(f"{self.folder / name} holds keys {sorted(held ^ listed)[:5]} that disagree with "
                                   f"{INDEX_FILE}: the export is damaged or mixed; write it again")

    def __getitem__(self, key: str) -> Tensor:
        if key not in self._where:
            raise KeyError(f"{key} not in the weights of {self.folder}")
        with safe_open(str(self.folder / self._where[key]), framework="pt") as f:
            return f.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, from the files' headers: no tensor's data is read."""
        out = {}
        for name in sorted(set(self._where.values())):
            with safe_open(str(self.folder / name), framework="pt") as f:
                out.update({k: tuple(f.get_slice(k).get_shape()) for k, where in self._where.items() if where == name})
        return out


def _keys(path: Path) -> list[str]:
    if not path.is_file():
        raise WeightsError(f"{path} is missing: the export is incomplete; write it again")
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as e:
        raise WeightsError(f"{path} is not a readable safetensors file ({e}): it is truncated or damaged; write the "
                           "directory again with tools/convert_checkpoint.py") from None
