"""EMA against a float64 recurrence written out by hand."""
import pytest
import torch

from sedd_scale.ema import EMA


def test_ema_follows_the_reference_warmup_recurrence():
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(3, 2, generator=gen), torch.randn(4, generator=gen)]
    ema = EMA(params, decay=0.9)
    expected = [p.double().clone() for p in params]
    for n in range(30):
        for p in params:
            p.add_(torch.randn(p.shape, generator=gen))
        ema.update(params)
        d = min(0.9, (1 + n) / (10 + n))
        expected = [d * e + (1 - d) * p.double() for e, p in zip(expected, params)]
    for s, e in zip(ema.shadow, expected):
        torch.testing.assert_close(s.double(), e, rtol=1e-6, atol=1e-6)
    current = [p.clone() for p in params]
    with ema.applied(params):
        torch.testing.assert_close(params[0], ema.shadow[0])
    torch.testing.assert_close(params[0], current[0])  # restored afterwards

    restored = EMA([torch.zeros(3, 2), torch.zeros(4)])
    restored.load_state_dict(ema.state_dict())
    assert restored.num_updates == 30 and torch.equal(restored.shadow[1], ema.shadow[1])
    with pytest.raises(ValueError, match="another layout"):
        EMA([torch.zeros(6)]).load_state_dict(ema.state_dict())
