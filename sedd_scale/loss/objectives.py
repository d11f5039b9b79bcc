"""The objective seam of the fused head: what an objective provides, and the registry the recipe's
`diffusion.objective` (with `model.graph`) selects from. A new objective is one module that registers its
classes with `@objective(name, graph)` (imported by `sedd_scale/loss/__init__.py`) plus its recipe name.

An objective is either unnormalized (score entropy: every vocabulary entry's term is local to its TP shard, the
network outputs log-ratios, `ModelConfig.parametrization` "ratios") or `normalized` (masked cross-entropy: a softmax
over the N real tokens, whose log-sum-exp the head combines across the TP shards once per chunk and hands to
`terms` as `lse`; the network outputs denoiser logits, parametrization "denoiser")."""
from __future__ import annotations

from typing import ClassVar, Protocol

import torch
from torch import Tensor


class Selected(Protocol):
    """Per projected token: what an objective's chunk terms need; `rows` indexes the flattened tokens (None: all)."""

    rows: Tensor | None

    def chunk(self, s: int, e: int) -> "Selected": ...


class HeadObjective(Protocol):
    """An objective fused with the vocabulary-parallel head. `normalized` is optional (absent: False); a normalized
    objective's `terms` takes the chunk's global log-sum-exp over the real tokens as the keyword `lse`."""

    graph: str
    num_tokens: int
    normalized: ClassVar[bool]

    @property
    def graph_dim(self) -> int: ...

    def select(self, x_t: Tensor, x_0: Tensor, sigma: Tensor, vocab_start: int, n_local: int,
               dtype: torch.dtype) -> Selected: ...

    def terms(self, z: Tensor, tok: Selected, scale: Tensor | None,
              compiled: bool) -> tuple[Tensor, Tensor | None]: ...


def is_normalized(obj) -> bool:
    """Whether an objective (instance or class) is a softmax over the real tokens (its `normalized` flag)."""
    return bool(getattr(obj, "normalized", False))


def parametrization_of(name: str) -> str:
    """The model output the objective `name` trains: "denoiser" logits (normalized objectives) or log-"ratios"."""
    classes = [cls for (n, _), cls in OBJECTIVES.items() if n == name]
    if not classes:
        raise ValueError(f"unknown objective {name!r}; choose one of {sorted({n for n, _ in OBJECTIVES})}")
    return "denoiser" if is_normalized(classes[0]) else "ratios"


OBJECTIVES: dict[tuple[str, str], type] = {}


def objective(name: str, graph: str):
    """Class decorator: register an objective under (recipe name, graph)."""
    def register(cls: type) -> type:
        if (name, graph) in OBJECTIVES:
            raise ValueError(f"objective {name!r} for the {graph} graph is registered twice")
        OBJECTIVES[name, graph] = cls
        return cls
    return register


def head_objective(name: str, graph: str, num_tokens: int, *, scale_by_sigma: bool = False) -> HeadObjective:
    """The registered objective `name` for `graph` (the recipe's diffusion.objective and model.graph)."""
    if (name, graph) not in OBJECTIVES:
        known = sorted({n for n, _ in OBJECTIVES})
        if name not in known:
            raise ValueError(f"unknown objective {name!r}; choose one of {known}")
        graphs = sorted(g for n, g in OBJECTIVES if n == name)
        raise ValueError(f"objective {name!r} is defined for the graphs {graphs}, not {graph!r}")
    return OBJECTIVES[name, graph](num_tokens=num_tokens, scale_by_sigma=scale_by_sigma)
