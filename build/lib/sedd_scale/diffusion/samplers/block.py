"""Block (semi-autoregressive) decoding: blocks of `size` positions left to right, an inner sampler in each.

While block j is decoded, the blocks before it hold their decoded tokens and the blocks after it are
MASK (absorbing graph); the inner sampler (any registered one but `block`) runs from all-MASK inside
the block with everything outside it clamped. The `steps` budget is split as evenly as possible over
the blocks that have a position to generate (at least one step each, so NFE >= their number).

Exactness: with exact scores, MASK at the later positions is the absorbing process's way of leaving
them unobserved, so the inner sampler draws block j from p(block j | blocks < j, given tokens) and the
blocks multiply to the exact joint: block decoding is as exact as its inner sampler. A SEDD network is
another matter: a clean prefix followed by a fully masked suffix, at the inner grid's noise level, is
far from the states it was trained on (uniformly masked at one level), so expect a bias there.

Infilling: given tokens are kept everywhere and are visible to every block, also those in later
blocks (they are clean, so conditioning on them is exact); a block made only of given tokens is
skipped (no evaluation).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..sampling import Infill
from .registry import Sampler, build_sampler, convert_option, sampler

DEFAULT_SIZE = 32


@sampler("block")
@dataclass
class Block(Sampler):
    """Semi-autoregressive decoding: `inner` inside blocks of `size` positions, left to right."""

    size: int = DEFAULT_SIZE
    inner: Sampler = field(default_factory=lambda: build_sampler("analytic"))
    graphs = ("absorb",)  # later blocks are held at MASK
    exactness = ("as exact as its inner sampler with exact scores (later blocks masked = unobserved); a SEDD "
                 "network sees a masked suffix it was not trained on")

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"block:size must be >= 1, got {self.size}")
        if isinstance(self.inner, Block):
            raise ValueError("block:inner cannot be block itself: pick analytic, euler, cached or confidence")

    @classmethod
    def from_options(cls, options: dict[str, str]) -> "Block":
        """`size` and `inner` are the block's; every other option is the inner sampler's."""
        options = dict(options)
        size = convert_option(options.pop("size"), int, "block:size") if "size" in options else DEFAULT_SIZE
        inner = options.pop("inner", "analytic")
        if inner == "block":
            raise ValueError("block:inner cannot be block itself: pick analytic, euler, cached or confidence")
        return cls(size=size, inner=build_sampler(inner, options))

    def options(self) -> dict[str, object]:
        """size, inner and the inner sampler's options (flat, as `from_options` reads them)."""
        return {"size": self.size, "inner": self.inner.name, **self.inner.options()}

    def blocks(self, length: int, given: torch.Tensor) -> list[tuple[int, int]]:
        """[start, stop) of the blocks with a position to generate (`given`: (B, L) bool)."""
        spans = [(s, min(s + self.size, length)) for s in range(0, length, self.size)]
        return [(s, e) for s, e in spans if not bool(given[:, s:e].all())]

    def run(self, score, graph, noise, shape, *, steps, eps, denoise, infill, device, generator):
        """Each block with its share of the steps, later blocks masked."""
        batch, length = shape
        x = graph.sample_limit(batch, length, device=device, generator=generator)
        given = torch.zeros(batch, length, dtype=torch.bool, device=x.device)
        if infill is not None:
            given = given | infill.positions.to(x.device)
            x = infill(x)
        todo = self.blocks(length, given)
        for j, (start, stop) in enumerate(todo):
            share = max(1, steps // len(todo) + (j < steps % len(todo)))
            outside = torch.ones(batch, length, dtype=torch.bool, device=x.device)
            outside[:, start:stop] = given[:, start:stop]
            x = self.inner.run(score, graph, noise, shape, steps=share, eps=eps, denoise=denoise,
                               infill=Infill(outside, x.clone()), device=device, generator=generator)
        return x
