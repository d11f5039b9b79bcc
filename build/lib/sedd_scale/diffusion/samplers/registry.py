"""The sampler seam: what a sampler provides, the registry `--sampler` / `train.sampler` select from, and NFE counting.

A sampler is a dataclass of its options registered with `@sampler(name)`; a new one is one module in this
package plus one import line in its `__init__.py`. It is built from a spec string `NAME[:key=value,...]`
(`parse_sampler("confidence:threshold=0.9")`), every option converted to its field's type and checked by
the class's `__post_init__`. Calling it runs the sampler through an `NFECounter` and returns the tokens with
the network evaluations they cost.

Every sampler sees the same arguments as `sedd_scale.diffusion.sampling.sample`: `steps` is the budget of
predictor steps, `eps` the last time, `denoise` whether a final jump to noise 0 follows, `infill` the clamp
of given tokens (kept at every step; see each sampler for what it does with them).
"""
from __future__ import annotations

import math
import typing
from dataclasses import dataclass, fields
from typing import ClassVar, Literal

import torch
from torch import Tensor

from ..graph import Graph
from ..noise import Noise
from ..reference_loss import LogScoreFn
from ..sampling import Infill

SAMPLERS: dict[str, type["Sampler"]] = {}


def sampler(name: str):
    """Class decorator: register a sampler (a dataclass of options) under `name`."""
    def register(cls: type) -> type:
        if name in SAMPLERS:
            raise ValueError(f"sampler {name!r} is registered twice")
        cls.name = name
        SAMPLERS[name] = cls
        return cls
    return register


class NFECounter:
    """A log-score function that counts the network evaluations made through it.

    `calls` counts network calls; `rows` counts sequences passed through the network (a sampler may evaluate a
    subset of the batch). `nfe` = rows / batch: network evaluations per sequence, the cost measure of the table.
    """

    def __init__(self, log_score_fn: LogScoreFn, batch: int):
        self.log_score_fn, self.batch = log_score_fn, batch
        self.calls = self.rows = 0

    def __call__(self, x: Tensor, total: Tensor) -> Tensor:
        """The wrapped function's log-scores, counted."""
        self.calls += 1
        self.rows += x.shape[0]
        return self.log_score_fn(x, total)

    @property
    def nfe(self) -> float:
        """Network evaluations per sequence."""
        return self.rows / max(self.batch, 1)


@dataclass
class Sampled:
    """A sampler's tokens (B, L) and their cost: `nfe` evaluations per sequence over `calls` network calls."""

    tokens: Tensor
    nfe: float
    calls: int


class Sampler:
    """Base of the registered samplers: options are dataclass fields, `run` draws the tokens."""

    name: ClassVar[str]
    # One sentence: when the sampler draws from the model's distribution exactly, and what it trades otherwise.
    exactness: ClassVar[str]
    graphs: ClassVar[tuple[str, ...]] = ("absorb", "uniform")  # the graphs it can sample

    def check_graph(self, graph: str) -> None:
        """Raise ValueError unless this sampler works with `graph` ("absorb" or "uniform")."""
        if graph not in self.graphs:
            raise ValueError(f"the {self.name} sampler needs the {' or '.join(self.graphs)} graph, not {graph}: "
                             f"pick one of {sorted(n for n, c in SAMPLERS.items() if graph in c.graphs)}")

    @classmethod
    def from_options(cls, options: dict[str, str]) -> "Sampler":
        """An instance from string options, each converted to its field's type; unknown keys are refused."""
        hints = typing.get_type_hints(cls)
        names = [f.name for f in fields(cls)]
        kwargs = {}
        for key, text in options.items():
            if key not in names:
                raise ValueError(f"sampler {cls.name!r} has no option {key!r}; its options: {names or 'none'}")
            kwargs[key] = convert_option(text, hints[key], f"{cls.name}:{key}")
        return cls(**kwargs)

    def options(self) -> dict[str, object]:
        """The options that differ from their defaults (what `spec` writes)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != f.default}

    def spec(self) -> str:
        """The canonical spec string: NAME[:key=value,...] (non-default options only)."""
        opts = ",".join(f"{k}={v}" for k, v in self.options().items())
        return f"{self.name}:{opts}" if opts else self.name

    def run(self, score: LogScoreFn, graph: Graph, noise: Noise, shape: tuple[int, int], *, steps: int, eps: float,
            denoise: bool, infill: Infill | None, device, generator: torch.Generator | None) -> Tensor:
        """Draw (B, L) tokens, calling `score` for every network evaluation."""
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, log_score_fn: LogScoreFn, graph: Graph, noise: Noise, shape: tuple[int, int], *, steps: int,
                 eps: float = 1e-5, denoise: bool = True, infill: Infill | None = None, device=None,
                 generator: torch.Generator | None = None) -> Sampled:
        """Draw (B, L) sequences and count the network evaluations they took."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if not 0.0 < eps < 1.0:
            raise ValueError(f"the sampler's last time eps must be in (0, 1), got {eps}")
        self.check_graph("absorb" if graph.absorb else "uniform")
        counter = NFECounter(log_score_fn, shape[0])
        x = self.run(counter, graph, noise, shape, steps=steps, eps=eps, denoise=denoise, infill=infill,
                     device=device, generator=generator)
        return Sampled(x, counter.nfe, counter.calls)


def convert_option(text: str, hint, where: str):
    """`text` as a value of the type `hint` (int, float, bool, str, X | None, Literal[...])."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is Literal:
        if text not in args:
            raise ValueError(f"{where} must be one of {list(args)}, got {text!r}")
        return text
    if type(None) in args:  # X | None
        if text.lower() == "none":
            return None
        (hint,) = [a for a in args if a is not type(None)]
    try:
        if hint is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return text.lower() in ("true", "1")
        value = hint(text)
    except ValueError:
        kind = {int: "an integer", float: "a number", bool: "true or false"}.get(hint, hint.__name__)
        raise ValueError(f"{where} must be {kind}, got {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where} must be finite, got {text!r}")
    return value


def split_spec(spec: str) -> tuple[str, dict[str, str]]:
    """"name:a=1,b=2" -> ("name", {"a": "1", "b": "2"}); option names may use - for _."""
    name, _, rest = spec.strip().partition(":")
    options: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise ValueError(f"sampler option {item!r} in {spec!r} is not key=value: write e.g. "
                             "confidence:threshold=0.9,top_k=4")
        options[key.strip().replace("-", "_")] = value.strip()
    return name.strip(), options


def build_sampler(name: str, options: dict[str, str] | None = None) -> Sampler:
    """The registered sampler `name` with string `options`."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[name].from_options(dict(options or {}))


def parse_sampler(spec: str, extra: dict[str, str] | None = None) -> Sampler:
    """A sampler from `NAME[:key=value,...]`, plus `extra` options (they win over the spec's)."""
    name, options = split_spec(spec)
    return build_sampler(name, {**options, **(extra or {})})


def masked_fraction_noise(x: Tensor, mask: int, noise: Noise, eps: float) -> Tensor:
    """Per sequence, the total noise whose absorbing masking probability 1 - e^-sigma equals the sequence's masked
    fraction, clamped to the grid's [sigma_bar(eps), sigma_bar(1)]: the level at which training saw such states."""
    frac = (x == mask).double().mean(1)
    lo = noise.total_noise(torch.tensor(eps, dtype=torch.float64, device=x.device))
    hi = noise.total_noise(torch.tensor(1.0, dtype=torch.float64, device=x.device))
    return (-torch.log1p(-frac.clamp(max=1.0 - 1e-12))).clamp(min=float(lo), max=float(hi))
