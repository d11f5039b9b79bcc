"""The exact samplers: tau-leaping with the analytic (Tweedie) or Euler predictor on the full time grid
(`sedd_scale.diffusion.sampling.sample`), one network evaluation per step plus the final denoise."""
from __future__ import annotations

from dataclasses import dataclass

from ..sampling import sample
from .registry import Sampler, sampler


@dataclass
class _TauLeaping(Sampler):
    predictor = "analytic"
    exactness = ("exact as steps grow (tau-leaping; sedd-math 5): with exact scores the law converges to the data's; "
                 "any graph, infilling exact for absorb")

    def run(self, score, graph, noise, shape, *, steps, eps, denoise, infill, device, generator):
        """`sampling.sample` with this predictor."""
        return sample(score, graph, noise, shape, steps=steps, predictor=self.predictor, eps=eps, denoise=denoise,
                      infill=infill, device=device, generator=generator)


@sampler("analytic")
@dataclass
class Analytic(_TauLeaping):
    """Tweedie tau-leaping (the reference's default): `steps` evaluations + 1 for the denoise."""

    predictor = "analytic"


@sampler("euler")
@dataclass
class Euler(_TauLeaping):
    """Euler tau-leaping with the reverse rates: `steps` evaluations + 1 for the denoise."""

    predictor = "euler"
