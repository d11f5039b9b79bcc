"""Model FLOPs per token against a hand count and against the matmuls a real training step dispatches; the
per-noise-level training loss; the logging interval's averages."""
from __future__ import annotations

import math

import pytest
import torch

from sedd_scale.diffusion import get_noise
from sedd_scale.model import preset
from sedd_scale.plan.flops import training_flops_per_token
from sedd_scale.train.metrics import IntervalStats, NoiseBandLoss


def test_flops_per_token_hand_count():
    """cpu-tiny's dims (H 128, 4 heads, 4 blocks, C 64, MLP 512, N 257, L 128), counted by hand."""
    cfg = preset("tiny", num_tokens=257, vocab_multiple=1)
    per_block = (2 * 128 * 384 + 2 * 128 * 128 + 2 * 128 * 512 * 2 + 4 * 128 * 128) * 3 + 2 * 64 * 768 * 3 / 128
    assert per_block == 1_376_256 + 2304  # per-token GEMMs and attention, then the per-sequence adaLN
    sigma_map = (2 * 256 * 64 * 2 + 2 * 64 * 64 * 3) / 128  # its first layer's input needs no gradient
    final = 2 * 64 * 256 * 3 / 128
    head = 2 * 128 * 257 * 3
    assert training_flops_per_token(cfg, 128) == 4 * per_block + sigma_map + final + head
    assert training_flops_per_token(cfg, 128, 0.5) == 4 * per_block + sigma_map + final + head / 2
    # the old convention (6 x every parameter: the input embedding, the whole head for every token, the adaLN
    # weights per token) overstates sedd-small absorb at L 1024 by half
    small = preset("small", vocab_multiple=1)
    honest = training_flops_per_token(small, 1024, 0.5)
    old = 6.0 * small.num_params() + 12.0 * small.n_blocks * small.hidden_size * 1024
    assert 1.5 < old / honest < 1.55


def _step_flops(cfg, x0: torch.Tensor, x_t: torch.Tensor) -> int:
    """Matmul FLOPs (FlopCounterMode) of one forward + backward of the training module, attention through the math
    kernel (whose batched products the counter sees)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from sedd_scale.distributed.pipeline import SEDDTrainModule, head_loss_config
    from sedd_scale.model import SEDD

    module = SEDDTrainModule(SEDD(cfg, device="cpu"), head_loss_config(cfg))
    sigma, rate = torch.full((x0.shape[0],), 0.7), torch.ones(x0.shape[0])
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        module(x0, x_t, sigma, rate).backward()
    return counter.get_total_flops()


@pytest.mark.megatron
@pytest.mark.parametrize("graph", ["absorb", "uniform"])
def test_flops_per_token_match_the_matmuls_of_a_training_step(tp1, graph):
    """The count equals what a real forward + backward dispatches (megatron linears, attention, the fused loss's
    three head GEMMs over the projected rows), given the step's actual share of projected positions."""
    cfg = preset("tiny", hidden_size=32, n_heads=4, n_blocks=2, cond_dim=16, num_tokens=40, vocab_multiple=8,
                 length=12, graph=graph, dropout=0.0)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 40, (3, 12), generator=g)
    masked = torch.rand(3, 12, generator=g) < 0.4
    x_t = torch.where(masked, 40, x0) if graph == "absorb" else torch.where(masked, (x0 + 1) % 40, x0)
    fraction = int(masked.sum()) / masked.numel() if graph == "absorb" else 1.0
    assert 0 < fraction < 1 or graph == "uniform"
    measured = _step_flops(cfg, x0, x_t)
    assert measured == pytest.approx(training_flops_per_token(cfg, 12, fraction) * x0.numel(), rel=1e-12)


def test_noise_band_loss_assigns_bands_by_t_and_averages_per_token():
    """Sequences go to the band of their t (found from sigma(t)); means are per token; take() starts over."""
    noise = get_noise("loglinear", eps=1e-3)
    bands = NoiseBandLoss(noise.total_noise)
    t = torch.tensor([0.05, 0.19, 0.21, 0.5, 0.99, 0.81, 0.6])
    per_sequence = torch.tensor([10.0, 20.0, 30.0, 40.0, 50.0, 70.0, 60.0])
    bands.add(noise.total_noise(t).float(), per_sequence)
    out = bands.take(seq_len=10)
    assert out == {"train/loss_per_token_t0.0-0.2": 1.5, "train/loss_per_token_t0.2-0.4": 3.0,
                   "train/loss_per_token_t0.4-0.6": 4.0, "train/loss_per_token_t0.6-0.8": 6.0,
                   "train/loss_per_token_t0.8-1.0": 6.0}
    assert bands.take(seq_len=10) == {}
    bands.add(noise.total_noise(torch.tensor([0.3])), torch.tensor([5.0]))
    assert bands.take(seq_len=1) == {"train/loss_per_token_t0.2-0.4": 5.0}


def test_interval_stats_average_applied_steps():
    """The logged loss is the mean over the interval's applied steps; time and data wait are summed."""
    stats = IntervalStats()
    for loss, seconds in ((2.0, 0.5), (None, 0.25), (4.0, 0.25)):
        stats.add(loss, seconds, 0.1)
    assert (stats.steps, stats.mean_loss(), stats.seconds) == (3, 3.0, 1.0)
    assert stats.data_wait == pytest.approx(0.3)
    assert math.isnan(IntervalStats().mean_loss())
