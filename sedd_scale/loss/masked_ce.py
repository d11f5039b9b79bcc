"""The masked cross-entropy objective of the fused head (MDLM's "SUBS" parametrization) on the absorbing graph.

At a masked position (x_t = MASK) the network's output z is the logits of the denoiser p(x0 = y | x_t) over the
N real tokens: MASK and vocabulary padding get no mass (SUBS), and unmasked positions carry no loss (they are not
projected, like absorb score entropy). The per-token loss is

    r0 * CE,   CE = logsumexp_{y < N} z_y - z_{x0},   r0 = 1 / (e^sigma - 1),

and the trainer's rate weight sigma(t) makes sigma(t) r0 = -alpha'/(1 - alpha) for alpha = e^-sigma_bar:
exactly MDLM's continuous-time weight, so the summed loss is MDLM's NELBO.

It is score entropy in another parametrization. With the exact conversion (`diffusion.parametrization`)

    log s_y = log_softmax(z)_y - log(e^sigma - 1)   (y < N; ratios summing to r0),

absorb score entropy sum_y s_y - r0 log s_x0 + K(r0) becomes r0 - r0 (log_softmax(z)_x0 + log r0) + r0 (log r0 - 1)
= r0 * CE: the K(r0) constant cancels, the two objectives agree on every network (and on the exact denoiser), and
the ELBO of a masked_ce-trained model is evaluated by this loss itself. The model records the parametrization
(`ModelConfig.parametrization = "denoiser"`), so samplers and evaluation turn its logits into these log-scores.

Vocabulary parallel: the normalizer spans the TP shards. The head (`vocab_parallel._forward_chunks`) computes each
chunk's logits once, takes the per-token log-sum-exp of the shard's real tokens and combines it across the TP group
in one all-gather (`diffusion.parametrization.shard_logsumexp`: the same value on every rank; a shard without real
tokens contributes -inf and still joins), then hands it to `terms`. Only the rank holding x0 adds r0 (lse - z_x0),
so the head's all-reduced per-token sum is exact, and the logit gradient r0 (softmax - onehot(x0)) is local: the
training path keeps its three GEMMs per chunk and never gathers full-vocabulary logits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from sedd_scale.compiled import Region
from sedd_scale.diffusion.parametrization import log_expm1
from sedd_scale.loss.objectives import objective


@dataclass
class _Masked:
    """Per masked token: x_0's local column, whether this shard holds it, and r0 = 1 / (e^sigma - 1)."""

    rows: Tensor | None  # indices into the flattened tokens
    col0: Tensor
    in0: Tensor
    r0: Tensor

    def chunk(self, s: int, e: int) -> "_Masked":
        """The same fields for active tokens s:e."""
        return _Masked(None, self.col0[s:e], self.in0[s:e], self.r0[s:e])


def _terms(z: Tensor, tok: _Masked, lse: Tensor, scale: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """(per-token partial loss, logit gradient or None) of a chunk of logits given the global lse; consumes z."""
    col0 = torch.where(tok.in0, tok.col0, 0).unsqueeze(1)
    z0 = z.gather(1, col0).squeeze(1)
    loss = torch.where(tok.in0, tok.r0 * (lse - z0), torch.zeros_like(lse))
    if scale is None:
        return loss, None
    g = z.sub_(lse.unsqueeze(1)).exp_()  # this shard's part of the softmax
    g.scatter_add_(1, col0, -tok.in0.to(g.dtype).unsqueeze(1))
    return loss, g.mul_((scale.to(g.dtype) * tok.r0).unsqueeze(1))


def _fused(z, col0, in0, r0, lse, scale):
    """`_terms` as one expression per output (nothing in place), for torch.compile."""
    z0 = z.gather(1, torch.where(in0, col0, 0).unsqueeze(1)).squeeze(1)
    loss = torch.where(in0, r0 * (lse - z0), 0.0)
    if scale is None:
        return loss, None
    at0 = (torch.arange(z.shape[1], device=z.device) == col0.unsqueeze(1)) & in0.unsqueeze(1)
    g = (z - lse.unsqueeze(1)).exp() - at0.to(z.dtype)
    return loss, g * (scale.to(z.dtype) * r0).unsqueeze(1)


FUSED = Region(_fused)


@objective("masked_ce", "absorb")
@dataclass(frozen=True)
class AbsorbMaskedCE:
    """Masked cross-entropy on the absorbing graph: per masked token r0 * (logsumexp_{y<N} z_y - z_x0)."""

    graph: ClassVar[str] = "absorb"
    normalized: ClassVar[bool] = True
    num_tokens: int
    scale_by_sigma: bool = False

    def __post_init__(self):
        if self.num_tokens < 2:
            raise ValueError(f"num_tokens must be >= 2, got {self.num_tokens}")
        if self.scale_by_sigma:
            raise ValueError("scale_by_sigma shifts every logit by the same amount, which masked_ce's softmax cancels: "
                             "set model.scale_by_sigma: false with diffusion.objective: masked_ce")

    @property
    def graph_dim(self) -> int:
        """States per position: N real tokens and MASK."""
        return self.num_tokens + 1

    def select(self, x_t: Tensor, x_0: Tensor, sigma: Tensor, vocab_start: int, n_local: int,
               dtype: torch.dtype) -> _Masked:
        """The masked tokens (one host sync: their count sizes what follows) and r0, formed in float64."""
        rows = torch.nonzero(x_t == self.num_tokens).squeeze(1)
        col0 = x_0[rows] - vocab_start
        r0 = torch.exp(-log_expm1(sigma[rows].double())).to(dtype)
        return _Masked(rows, col0, (col0 >= 0) & (col0 < n_local), r0)

    def terms(self, z: Tensor, tok: _Masked, scale: Tensor | None, compiled: bool, *,
              lse: Tensor) -> tuple[Tensor, Tensor | None]:
        """(per-token partial loss, logit gradient or None) of a chunk of this shard's real-token logits, `lse` the
        chunk's global log-sum-exp. Eager on a CPU (one in-place pass per output), fused elsewhere when compiled."""
        if not compiled or z.device.type == "cpu":
            return _terms(z, tok, lse, scale)
        return FUSED(True, z, tok.col0, tok.in0, tok.r0, lse, scale)
