"""A CPU stand-in for apex's FusedAdam with its optimizer state layout, for tests.

Like apex's (apex/optimizers/fused_adam.py and its multi_tensor_adam kernel): group settings lr,
bias_correction, betas, eps, weight_decay; the step count in the group (`group["step"]`, an int set
at the first step, one per group, advanced on every step() of a group that has parameters); per-parameter
state exp_avg and exp_avg_sq only, created as zeros at a parameter's first gradient. The update in
adam_w_mode is p <- p - lr * (m_hat / (sqrt(v_hat) + eps) + weight_decay * p), with m_hat and v_hat the
moments divided by 1 - beta^step (when bias_correction). torch's AdamW computes the same update in
another order (decay first), so the two agree to float32 rounding.
"""
from __future__ import annotations

import torch


class FusedAdam(torch.optim.Optimizer):
    """apex.optimizers.FusedAdam's interface and state layout, computed with torch ops."""

    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8, adam_w_mode=True,
                 weight_decay=0.0, amsgrad=False, set_grad_none=True):
        if amsgrad:
            raise RuntimeError("FusedAdam does not support the AMSGrad variant.")
        super().__init__(params, dict(lr=lr, bias_correction=bias_correction, betas=betas, eps=eps,
                                      weight_decay=weight_decay))
        self.adam_w_mode = 1 if adam_w_mode else 0
        self.set_grad_none = set_grad_none

    @torch.no_grad()
    def step(self, closure=None):
        """One Adam(W) step of every group that has parameters."""
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            if not group["params"]:
                continue
            group["step"] = group.get("step", 0) + 1
            beta1, beta2 = group["betas"]
            step = group["step"]
            correct1 = 1 - beta1 ** step if group["bias_correction"] else 1.0
            correct2 = 1 - beta2 ** step if group["bias_correction"] else 1.0
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                g, m, v = p.grad.float(), state["exp_avg"], state["exp_avg_sq"]
                if not self.adam_w_mode:  # L2 mode: the decay joins the gradient
                    g = g + group["weight_decay"] * p.float()
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                update = (m / correct1) / ((v / correct2).sqrt() + group["eps"])
                if self.adam_w_mode:
                    update = update + group["weight_decay"] * p.float()
                p.sub_((group["lr"] * update).to(p.dtype))
        return loss
