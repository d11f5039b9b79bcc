"""Noise schedules: total noise sigma_bar(t) and its rate sigma(t) = d sigma_bar / dt (sedd-math 1.2)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class LogLinearNoise:
    """sigma_bar(t) = -log(1 - (1 - eps) t): the absorbing move probability 1 - e^-sigma_bar is (1 - eps) t."""

    eps: float = 1e-3

    def __post_init__(self):
        if not 0.0 < self.eps < 1.0:
            raise ValueError(f"loglinear noise needs 0 < eps < 1, got eps={self.eps}")

    def _survival(self, t: Tensor) -> Tensor:
        # 1 - (1 - eps) t written as (1 - t) + eps t: no cancellation near t = 1, where it is ~eps.
        return (1.0 - t) + self.eps * t

    def total_noise(self, t: Tensor) -> Tensor:
        """sigma_bar(t), in t's dtype and device (log1p for small t, the survival form near t = 1)."""
        return torch.where(t < 0.5, -torch.log1p(-(1.0 - self.eps) * t), -torch.log(self._survival(t)))

    def rate_noise(self, t: Tensor) -> Tensor:
        """sigma(t) = (1 - eps) / (1 - (1 - eps) t)."""
        return (1.0 - self.eps) / self._survival(t)

    def __call__(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(total_noise, rate) at t."""
        return self.total_noise(t), self.rate_noise(t)


@dataclass(frozen=True)
class GeometricNoise:
    """sigma_bar(t) = sigma_min^(1-t) sigma_max^t (the reference's schedule for the uniform graph)."""

    sigma_min: float = 1e-4
    sigma_max: float = 20.0

    def __post_init__(self):
        if not 0.0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"geometric noise needs 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")

    def total_noise(self, t: Tensor) -> Tensor:
        """sigma_bar(t), in t's dtype and device (constants are not rounded to float32 first)."""
        lo, hi = math.log(self.sigma_min), math.log(self.sigma_max)
        return torch.exp(lo + t * (hi - lo))

    def rate_noise(self, t: Tensor) -> Tensor:
        """sigma(t) = sigma_bar(t) log(sigma_max / sigma_min)."""
        return self.total_noise(t) * math.log(self.sigma_max / self.sigma_min)

    def __call__(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(total_noise, rate) at t."""
        return self.total_noise(t), self.rate_noise(t)


Noise = LogLinearNoise | GeometricNoise


def get_noise(kind: str, **kwargs) -> Noise:
    """Build a schedule by the reference's name: "loglinear" (eps) or "geometric" (sigma_min, sigma_max)."""
    kinds = {"loglinear": LogLinearNoise, "geometric": GeometricNoise}
    if kind not in kinds:
        raise ValueError(f"unknown noise type {kind!r}; choose one of {sorted(kinds)}")
    return kinds[kind](**kwargs)
