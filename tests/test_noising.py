"""Noising is a function of (seed, step, global row), not of the layout."""
import torch

from sedd_scale.diffusion import get_graph, get_noise
from sedd_scale.layout import row_offset as global_row_offset
from sedd_scale.train.noising import noise_batch


def test_any_split_of_the_global_batch_gets_the_same_noise():
    for kind, noise_kind in (("absorb", "loglinear"), ("uniform", "geometric")):
        graph, noise = get_graph(kind, num_tokens=11), get_noise(noise_kind)
        x0 = torch.randint(0, 11, (8, 16), generator=torch.Generator().manual_seed(0))
        full = noise_batch(x0, graph, noise, seed=3, step=7, row_offset=0, global_rows=8, stratified=True)
        for micro_batch, dp in ((2, 1), (2, 2), (1, 4), (4, 2)):
            parts = {}
            for micro in range(8 // (micro_batch * dp)):
                for rank in range(dp):
                    start = global_row_offset(micro, rank, micro_batch, dp)
                    parts[start] = noise_batch(x0[start:start + micro_batch], graph, noise, seed=3, step=7,
                                               row_offset=start, global_rows=8, stratified=True)
            rows = [parts[k] for k in sorted(parts)]
            assert torch.equal(torch.cat([p.x_t for p in rows]), full.x_t)
            assert torch.equal(torch.cat([p.total_noise for p in rows]), full.total_noise)
            assert torch.equal(torch.cat([p.rate for p in rows]), full.rate)
        other = noise_batch(x0, graph, noise, seed=3, step=8, row_offset=0, global_rows=8)
        assert not torch.equal(other.x_t, full.x_t)
        assert bool((full.total_noise > 0).all())
