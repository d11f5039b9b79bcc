"""EMA against a float64 recurrence written out by hand, and its sharding over data-parallel ranks."""
import pytest
import torch

from sedd_scale.layout import shard_bounds
from sedd_scale.train.ema import EMA
from tests.dist import launch


def _trajectory(seed: int = 0, steps: int = 30):
    """Parameters and the updates applied to them: [(3, 2), (4,), (1,)] tensors, `steps` random steps."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(3, 2, generator=gen), torch.randn(4, generator=gen), torch.randn(1, generator=gen)]
    steps = [[torch.randn(p.shape, generator=gen) for p in params] for _ in range(steps)]
    return params, steps


def _expected(decay: float = 0.9):
    params, steps = _trajectory()
    expected = [p.double().clone() for p in params]
    for n, deltas in enumerate(steps):
        params = [p + d for p, d in zip(params, deltas)]
        d = min(decay, (1 + n) / (10 + n))
        expected = [d * e + (1 - d) * p.double() for e, p in zip(expected, params)]
    return expected


def test_ema_follows_the_reference_warmup_recurrence():
    params, steps = _trajectory()
    ema = EMA(params, decay=0.9)
    for deltas in steps:
        for p, d in zip(params, deltas):
            p.add_(d)
        ema.update(params)
    for s, e in zip(ema.whole_tensors(), _expected()):
        torch.testing.assert_close(s.double(), e.flatten(), rtol=1e-6, atol=1e-6)
    current = [p.clone() for p in params]
    with ema.applied(params):
        torch.testing.assert_close(params[0].flatten(), ema.whole_tensors()[0])
    torch.testing.assert_close(params[0], current[0])  # restored afterwards

    restored = EMA([torch.zeros(3, 2), torch.zeros(4), torch.zeros(1)])
    restored.load_state_dict(ema.state_dict())
    assert restored.num_updates == 30 and torch.equal(restored.shadow, ema.shadow)
    with pytest.raises(ValueError, match="another layout"):
        EMA([torch.zeros(6)]).load_state_dict(ema.state_dict())


def test_shard_bounds_cover_every_element_once():
    for numel in (1, 2, 7, 64):
        for dp in (1, 2, 3, 8):
            covered = [i for r in range(dp) for i in range(*shard_bounds(numel, r, dp))]
            assert covered == list(range(numel)), (numel, dp)


def _sharded(dp_size: int):
    import torch.distributed as dist

    params, steps = _trajectory()
    ema = EMA(params, decay=0.9, dp_rank=dist.get_rank(), dp_size=dp_size)
    for deltas in steps:
        for p, d in zip(params, deltas):
            p.add_(d)
        ema.update(params)
    with ema.applied(params):
        applied = [p.clone() for p in params]
    return {"whole": ema.whole_tensors(), "applied": applied, "shadow_numel": ema.shadow.numel(),
            "state": ema.state_dict()}


@pytest.mark.slow
def test_sharded_ema_equals_the_unsharded_one_and_holds_a_third():
    """Three DP ranks: each averages a third of every tensor; gathered, it is the one-rank EMA exactly."""
    results = launch(_sharded, 3, 3)
    expected = _expected()
    for r in results:
        for s, a, e in zip(r["whole"], r["applied"], expected):
            torch.testing.assert_close(s.double(), e.flatten(), rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(a.flatten(), s)
    # per rank: ceil(6/3) + ceil(4/3) + ceil(1/3) = 2 + 2 + 1 padded elements of the 11 in all
    assert [r["shadow_numel"] for r in results] == [5, 5, 5]
    assert [r["state"]["dp_rank"] for r in results] == [0, 1, 2]
