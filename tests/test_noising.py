"""Noising is a function of (seed, step, micro-batch, global row), not of the layout."""
import torch

from sedd_scale.diffusion import get_graph, get_noise
from sedd_scale.noising import noise_batch


def test_data_parallel_slices_equal_the_single_process_batch():
    for kind, noise_kind in (("absorb", "loglinear"), ("uniform", "geometric")):
        graph, noise = get_graph(kind, num_tokens=11), get_noise(noise_kind)
        x0 = torch.randint(0, 11, (8, 16), generator=torch.Generator().manual_seed(0))
        full = noise_batch(x0, graph, noise, seed=3, step=7, micro=1, row_offset=0, global_rows=8, stratified=True)
        parts = [noise_batch(x0[r * 2:(r + 1) * 2], graph, noise, seed=3, step=7, micro=1, row_offset=r * 2,
                             global_rows=8, stratified=True) for r in range(4)]
        assert torch.equal(torch.cat([p.x_t for p in parts]), full.x_t)
        assert torch.equal(torch.cat([p.total_noise for p in parts]), full.total_noise)
        assert torch.equal(torch.cat([p.rate for p in parts]), full.rate)
        other = noise_batch(x0, graph, noise, seed=3, step=8, micro=1, row_offset=0, global_rows=8)
        assert not torch.equal(other.x_t, full.x_t)
        assert bool((full.total_noise > 0).all())
