"""Noise schedules: total noise sigma_bar(t) and its rate sigma(t) = d sigma_bar / dt (sedd-math 1.2).

A schedule is a frozen dataclass that validates its own parameters, registered under its recipe name
(`diffusion.noise`) with `@schedule`; `recipe_keys` maps its parameters to the recipe's `diffusion` keys.
A new schedule is one class here (or in its own module, imported by the package) plus its recipe name.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import ClassVar, Protocol

import torch
from torch import Tensor


class Noise(Protocol):
    """What the diffusion code needs of a schedule."""

    name: ClassVar[str]
    recipe_keys: ClassVar[dict[str, str]]

    def total_noise(self, t: Tensor) -> Tensor: ...

    def rate_noise(self, t: Tensor) -> Tensor: ...

    def __call__(self, t: Tensor) -> tuple[Tensor, Tensor]: ...


SCHEDULES: dict[str, type] = {}


def schedule(cls: type) -> type:
    """Register a schedule class under its `name` (the recipe's `diffusion.noise`)."""
    if cls.name in SCHEDULES:
        raise ValueError(f"noise schedule {cls.name!r} is registered twice")
    SCHEDULES[cls.name] = cls
    return cls


def noise_spec(noise: Noise) -> dict:
    """The schedule as checkpoints record it: {"type": name, **its parameters}."""
    return {"type": noise.name, **{f.name: getattr(noise, f.name) for f in fields(noise)}}


@schedule
@dataclass(frozen=True)
class LogLinearNoise:
    """sigma_bar(t) = -log(1 - (1 - eps) t): the absorbing move probability 1 - e^-sigma_bar is (1 - eps) t."""

    name: ClassVar[str] = "loglinear"
    recipe_keys: ClassVar[dict[str, str]] = {"eps": "noise_eps"}
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

    def masked_fraction(self, t_min: float) -> float:
        """E over t ~ U[t_min, 1] of the absorbing move probability (1 - eps) t: closed form."""
        return (1.0 - self.eps) * (1.0 + t_min) / 2.0


@schedule
@dataclass(frozen=True)
class GeometricNoise:
    """sigma_bar(t) = sigma_min^(1-t) sigma_max^t (the reference's schedule for the uniform graph)."""

    name: ClassVar[str] = "geometric"
    recipe_keys: ClassVar[dict[str, str]] = {"sigma_min": "sigma_min", "sigma_max": "sigma_max"}
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


def get_noise(kind: str, **kwargs) -> Noise:
    """Build a registered schedule by its name ("loglinear": eps; "geometric": sigma_min, sigma_max)."""
    if kind not in SCHEDULES:
        raise ValueError(f"unknown noise type {kind!r}; choose one of {sorted(SCHEDULES)}")
    return SCHEDULES[kind](**kwargs)


def masked_fraction(noise: Noise, t_min: float) -> float:
    """E over t ~ U[t_min, 1] of 1 - e^{-sigma_bar(t)}, the absorbing graph's probability that a token is masked:
    the schedule's closed form where it has one, else Simpson's rule on its own total_noise in float64."""
    if hasattr(noise, "masked_fraction"):
        return noise.masked_fraction(t_min)
    n = 4096  # the integrand is smooth in t: the error is far below what MFU needs
    t = torch.linspace(t_min, 1.0, n + 1, dtype=torch.float64)
    y = -torch.expm1(-noise.total_noise(t))
    return float((y[0] + y[-1] + 4 * y[1:-1:2].sum() + 2 * y[2:-1:2].sum()) / (3 * n))


def sample_times(batch: int, *, eps: float, stratified: bool = False, device=None,
                 dtype: torch.dtype = torch.float32, generator: torch.Generator | None = None) -> Tensor:
    """t in [eps, 1]: i.i.d. uniform, or stratified (one draw in each of `batch` equal strata, shuffled)."""
    u = torch.rand(batch, device=device, dtype=dtype, generator=generator)
    if stratified:
        perm = torch.randperm(batch, device=device, generator=generator).to(dtype)
        u = (perm + u) / batch
    return eps + (1.0 - eps) * u
