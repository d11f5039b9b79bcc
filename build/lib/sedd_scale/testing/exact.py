"""Exact, enumerable diffusion quantities in float64, built from the definitions (matrix exponentials
and full joint tables), independent of the library's closed forms: the oracle of the tests and demos."""
from __future__ import annotations

import itertools

import numpy as np
import torch

F64 = torch.float64


def generator_matrix(kind: str, n: int) -> torch.Tensor:
    """Q in column convention from its definition: Q[y, x] = rate of x -> y."""
    if kind == "absorb":
        q = torch.zeros(n + 1, n + 1, dtype=F64)
        for x in range(n):
            q[n, x], q[x, x] = 1.0, -1.0
        return q
    return torch.full((n, n), 1.0 / n, dtype=F64) - torch.eye(n, dtype=F64)


def transition_matrix(kind: str, n: int, sigma: float) -> torch.Tensor:
    """exp(sigma Q) by torch's matrix exponential: column x0 is p_t|0(. | x0)."""
    return torch.linalg.matrix_exp(sigma * generator_matrix(kind, n))


def random_joint(n: int, d: int, seed: int, product: bool = False) -> torch.Tensor:
    """A full-support data distribution over n^d sequences as a (n,)*d tensor."""
    rng = np.random.default_rng(seed)
    if product:
        joint = torch.ones((), dtype=F64)
        for _ in range(d):
            joint = joint[..., None] * torch.tensor(rng.dirichlet(np.ones(n)), dtype=F64)
        return joint
    return torch.tensor(rng.dirichlet(np.full(n ** d, 0.7)), dtype=F64).reshape((n,) * d)


class Enumerated:
    """The noised marginals p_t of a joint p0 and their exact concrete scores."""

    def __init__(self, kind: str, p0: torch.Tensor):
        self.kind, self.p0 = kind, p0
        self.n, self.d = p0.shape[0], p0.dim()
        self.dim = self.n + 1 if kind == "absorb" else self.n
        self.states = torch.tensor(list(itertools.product(range(self.dim), repeat=self.d)), dtype=torch.long)
        self.clean = torch.tensor(list(itertools.product(range(self.n), repeat=self.d)), dtype=torch.long)

    def marginal(self, sigma: float) -> torch.Tensor:
        """p_t over dim^d sequences (tensor of shape (dim,)*d)."""
        p = transition_matrix(self.kind, self.n, sigma)[:, : self.n]  # (dim, n): columns are real x0
        out = self.p0
        for axis in range(self.d):
            out = torch.tensordot(p, out, dims=([1], [axis])).movedim(0, axis)
        return out

    def conditional(self, x0: torch.Tensor, sigma: float) -> torch.Tensor:
        """p_t|0(x_t | x0) for every state x_t (flat, in self.states order)."""
        p = transition_matrix(self.kind, self.n, sigma)
        return p[self.states, x0[None, :]].prod(-1)

    def log_score(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """log p_t(x with x_i = y) - log p_t(x) for x (B, d): (B, d, dim)."""
        logp = self.marginal(sigma).log()
        base = logp[tuple(x.T)]
        out = torch.empty(*x.shape, self.dim, dtype=F64)
        for i in range(self.d):
            for y in range(self.dim):
                z = x.clone()
                z[:, i] = y
                out[:, i, y] = logp[tuple(z.T)] - base
        return out

    def log_score_fn(self):
        """A sampler/loss score function (x, total_noise (B,)) -> exact log-scores."""
        weights = self.dim ** torch.arange(self.d - 1, -1, -1)
        tables: dict[float, torch.Tensor] = {}  # noise level -> every state's scores (runs on one grid share them)
        keep = max(4, (64 << 20) // (self.states.numel() * self.dim * 8))  # at most ~64 MiB of tables

        def table(sig: float) -> torch.Tensor:
            if sig not in tables:
                if len(tables) >= keep:
                    tables.pop(next(iter(tables)))
                tables[sig] = self.log_score(self.states, sig)
            return tables[sig]

        def fn(x, total):
            # Every state's scores at each distinct noise level (dim^d rows), then a lookup by the state's flat index.
            total = total.double().reshape(-1).expand(x.shape[0])
            flat = (x * weights).sum(-1)
            out = torch.empty(*x.shape, self.dim, dtype=F64)
            for sig in torch.unique(total):
                rows = total == sig
                out[rows] = table(float(sig))[flat[rows]]
            return out
        return fn


def total_variation(samples: torch.Tensor, probs: torch.Tensor) -> float:
    """TV between the empirical law of samples (B, d) and a (n,)*d table."""
    flat = torch.zeros(probs.numel(), dtype=F64)
    idx = torch.zeros(samples.shape[0], dtype=torch.long)
    for i in range(samples.shape[1]):
        idx = idx * probs.shape[i] + samples[:, i]
    flat.index_add_(0, idx, torch.ones(samples.shape[0], dtype=F64))
    return 0.5 * float((flat / samples.shape[0] - probs.reshape(-1)).abs().sum())
