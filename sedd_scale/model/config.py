"""The SEDD transformer's configuration and size presets (sedd-math section 4)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch

SIGMA_FEATURES = 256  # width of the sinusoidal noise-level features (the reference's TimestepEmbedder)


@dataclass
class ModelConfig:
    """Architecture and numerics of the DDiT network; the defaults are the paper's `small` absorb model."""

    hidden_size: int = 768  # width H of every block
    n_heads: int = 12  # attention heads (divisible by parallel.tp)
    n_blocks: int = 12  # transformer blocks (divisible by parallel.pp)
    cond_dim: int = 128  # width of the noise-level conditioning vector c
    mlp_ratio: int = 4  # MLP width / hidden_size (the hub format knows only 4)
    num_tokens: int = 50257  # real tokens N (GPT-2); absorb adds MASK at index N
    graph: Literal["absorb", "uniform"] = "absorb"  # the diffusion graph: absorbing MASK state, or uniform
    scale_by_sigma: bool = True  # absorb only: shift the output by -log(e^sigma - 1) - log N
    # What the raw output is: log-ratios (ratios; diffusion.objective score_entropy) or, absorb only, the denoiser's
    # logits over the N real tokens (denoiser; diffusion.objective masked_ce), turned into log-scores by a softmax.
    parametrization: Literal["ratios", "denoiser"] = "ratios"
    dropout: float = 0.1  # on each residual branch before its gate (the reference's only dropout)
    attention_dropout: float = 0.0  # on attention probabilities (0 in the reference)
    length: int = 1024  # training sequence length (recorded in the hub config; rotary tables follow the input)
    rotary_base: float = 10000.0  # rotary position embedding base
    # The vocabulary is padded to a multiple of tp_size * vocab_multiple (128 suits GPU matmuls;
    # 1 keeps exact reference shapes at TP=1). Padded entries never carry probability mass.
    vocab_multiple: int = 128
    # fp32; bf16 (bf16 parameters and compute, norms in fp32); bf16-mixed (fp32 parameters, blocks
    # and output layer under bf16 autocast with fp32 norms: the reference's GPU mode).
    precision: Literal["fp32", "bf16", "bf16-mixed"] = "fp32"
    activation_checkpointing: bool = False  # recompute each block in the backward pass
    # Regional torch.compile of the blocks' elementwise work (transformer.py, "Regional compilation"):
    # the same arithmetic, fused; compiled on the first steps (about half a minute on 2 CPU cores).
    compile: bool = False
    name: str = "custom"  # a label for logs and exports

    def __post_init__(self):
        for key in ("hidden_size", "n_heads", "n_blocks", "cond_dim", "mlp_ratio", "num_tokens", "length",
                    "vocab_multiple"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"model.{key} must be a positive integer, got {getattr(self, key)!r}")
        if self.hidden_size % self.n_heads:
            raise ValueError(f"model.hidden_size={self.hidden_size} is not divisible by n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head dim, got {self.head_dim}: change n_heads")
        if self.graph not in ("absorb", "uniform"):
            raise ValueError(f"model.graph must be 'absorb' or 'uniform', got {self.graph!r}")
        if self.graph == "uniform" and self.scale_by_sigma:
            raise ValueError("model.scale_by_sigma must be false with the uniform graph (the reference asserts it)")
        if self.parametrization not in ("ratios", "denoiser"):
            raise ValueError(f"model.parametrization must be 'ratios' or 'denoiser', got {self.parametrization!r}")
        if self.parametrization == "denoiser" and self.graph != "absorb":
            raise ValueError("model.parametrization=denoiser is defined for the absorb graph only (a softmax over the "
                             "clean tokens at masked positions): set model.graph: absorb or model.parametrization: "
                             "ratios")
        if self.parametrization == "denoiser" and self.scale_by_sigma:
            raise ValueError("model.scale_by_sigma shifts every logit by the same amount, which the denoiser's softmax "
                             "cancels: set model.scale_by_sigma: false with model.parametrization: denoiser")
        for key in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(f"model.{key} must be in [0, 1), got {getattr(self, key)}")
        if self.precision not in ("fp32", "bf16", "bf16-mixed"):
            raise ValueError(f"model.precision must be 'fp32', 'bf16' or 'bf16-mixed', got {self.precision!r}")
        if self.rotary_base <= 1.0:
            raise ValueError(f"model.rotary_base must be > 1, got {self.rotary_base}")

    @property
    def head_dim(self) -> int:
        """Per-head width D = hidden_size / n_heads."""
        return self.hidden_size // self.n_heads

    @property
    def vocab_size(self) -> int:
        """States per position: N + 1 for absorb (MASK last), N for uniform."""
        return self.num_tokens + (self.graph == "absorb")

    @property
    def params_dtype(self) -> torch.dtype:
        """Dtype the parameters are created in."""
        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """Dtype of the autocast region around blocks and output layer (None: no autocast)."""
        return torch.bfloat16 if self.precision == "bf16-mixed" else None

    def padded_vocab(self, tp_size: int) -> int:
        """Vocabulary size rounded up to a multiple of tp_size * vocab_multiple."""
        step = tp_size * self.vocab_multiple
        return -(-self.vocab_size // step) * step

    def check_tp(self, tp_size: int) -> None:
        """Raise if this network cannot be split over tp_size tensor-parallel ranks."""
        if self.n_heads % tp_size:
            divisors = [d for d in range(1, self.n_heads + 1) if self.n_heads % d == 0]
            raise ValueError(f"tensor-parallel size {tp_size} does not divide n_heads={self.n_heads}: "
                             f"choose one of {divisors}")

    def num_params(self, tp_size: int = 1) -> int:
        """Parameter count of the whole (unsharded) network with the vocabulary padded for tp_size."""
        h, c, v = self.hidden_size, self.cond_dim, self.padded_vocab(tp_size)
        f = self.mlp_ratio * h
        block = 2 * h + 3 * h * h + h * h + (h * f + f) + (f * h + h) + (6 * h * c + 6 * h)
        sigma_map = SIGMA_FEATURES * c + c + c * c + c
        final = h + 2 * h * c + 2 * h + v * h + v
        return v * h + sigma_map + self.n_blocks * block + final


# `small` and `medium` are the paper's (configs/model/*.yaml); the larger ones are for multi-node recipes.
PRESETS: dict[str, dict] = {
    "tiny": dict(hidden_size=128, n_heads=4, n_blocks=4, cond_dim=64, length=128),
    "small": dict(hidden_size=768, n_heads=12, n_blocks=12, cond_dim=128),
    "medium": dict(hidden_size=1024, n_heads=16, n_blocks=24, cond_dim=128),
    "1.3b": dict(hidden_size=2048, n_heads=16, n_blocks=20, cond_dim=256),
    "7b": dict(hidden_size=4096, n_heads=32, n_blocks=32, cond_dim=512),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A named size (tiny, small, medium, 1.3b, 7b) with field overrides, e.g. preset('small', graph='uniform')."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown ModelConfig fields {unknown}; valid fields: {sorted(fields)}")
    if overrides.get("graph") == "uniform" or overrides.get("parametrization") == "denoiser":
        overrides.setdefault("scale_by_sigma", False)
    return ModelConfig(**{"name": name, **PRESETS[name], **overrides})
