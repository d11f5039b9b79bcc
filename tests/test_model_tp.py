"""The SEDD transformer across tensor-parallel sizes, in real gloo processes.

TP=2 against the reference fixture; TP=1 vs 2 vs 4 forward outputs and every parameter's gradient
(shards gathered into the reference layout); dropout reproducibility; megatron-core's `_reduce`.
"""
import io as _io
import json

import pytest
import torch

from sedd_scale.checkpoint.hub import write_hub
from tests.dist import launch
from tests.test_model import ATOL, FIXTURE, expected_raw_scores, fixture_io, random_hub_state

pytestmark = [pytest.mark.slow, pytest.mark.megatron]  # megatron: rerun under 0.19.x by tools/test.sh

TINY = dict(hidden_size=64, n_heads=4, n_blocks=2, cond_dim=32, num_tokens=50, vocab_multiple=1, dropout=0.0)


def _pack(obj) -> bytes:
    # Tensors sent through the launcher's queue travel as shared-memory handles that die with the
    # worker; serialised bytes do not.
    buf = _io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _unpack(data: bytes):
    return torch.load(_io.BytesIO(data))


def _copy_to_region_grad() -> float:
    # The platform notes' reproducer of the megatron-core 0.16.1 `_reduce` bug: the gradient of a sum
    # is an expanded (stride-0) tensor; its all-reduce over TP ranks must come back summed.
    import sedd_scale.compat  # noqa: F401  (before megatron-core / DeepSpeed)

    from megatron.core import tensor_parallel

    from sedd_scale.distributed import parallel

    x = torch.ones(3, 4, requires_grad=True)
    tensor_parallel.copy_to_tensor_model_parallel_region(x).sum().backward()
    return float(x.grad.max()) / parallel.tp_size()  # 1.0 when reduced


def fixture_at_tp2(uniform_dir: str, out_dir: str) -> dict:
    """On 2 ranks: fixture outputs (absorb, no sigma scaling, uniform) and the hub export."""
    from sedd_scale.checkpoint.hub import read_hub, save_hub
    from sedd_scale.distributed import parallel
    from sedd_scale.pretrained import load_pretrained

    io = fixture_io()
    result = {}
    for name, path, kwargs in [("absorb", FIXTURE, dict(vocab_multiple=1)),
                               ("no_sigma_scaling", FIXTURE, dict(vocab_multiple=8, scale_by_sigma=False)),
                               ("uniform", uniform_dir, dict(vocab_multiple=1))]:
        model, _, _ = load_pretrained(path, tp_size=2, **kwargs)
        with torch.no_grad():
            out = model(io["indices"], io["sigma"])
        result[name] = (model.vocab_start, out.shape[-1], parallel.gather_tp(out))
    result["copy_to_grad"] = _copy_to_region_grad()
    hub_cfg, _ = read_hub(FIXTURE)
    model, _, _ = load_pretrained(FIXTURE, tp_size=2)
    save_hub(model, out_dir, hub_cfg)
    return _pack(result)


def test_fixture_parity_and_export_at_tp2(tmp_path):
    from safetensors.torch import load_file

    io = fixture_io()
    hub_cfg = json.loads((FIXTURE / "config.json").read_text())
    hub_cfg = {**hub_cfg, "tokens": 51, "graph": {"type": "uniform"}, "noise": {"type": "geometric"},
               "model": {**hub_cfg["model"], "scale_by_sigma": False}}
    uniform = write_hub(tmp_path / "uniform", hub_cfg, load_file(str(FIXTURE / "model.safetensors")))
    results = [_unpack(r) for r in launch(fixture_at_tp2, 2, str(uniform), str(tmp_path / "export"))]
    for rank, res in enumerate(results):
        assert res["copy_to_grad"] == 1.0, "copy_to_tensor_model_parallel_region lost the gradient all-reduce"
        start, local, out = res["absorb"]
        assert (start, local, out.shape) == (26 * rank, 26, (4, 32, 52))
        torch.testing.assert_close(out[..., :51], io["output_f32"], rtol=ATOL, atol=ATOL)
        assert bool((out[..., 51:] == float("-inf")).all())
        _, local, out = res["no_sigma_scaling"]
        assert local == 32
        torch.testing.assert_close(out[..., :51], expected_raw_scores(io), rtol=ATOL, atol=ATOL)
        torch.testing.assert_close(res["uniform"][2][..., :51], expected_raw_scores(io), rtol=ATOL, atol=ATOL)
    dev = (results[0]["absorb"][2][..., :51] - io["output_f32"]).abs().max().item()
    print(f"TP=2 max |out - output_f32| = {dev:.3g}")
    exported = load_file(str(tmp_path / "export" / "model.safetensors"))
    reference = load_file(str(FIXTURE / "model.safetensors"))
    assert set(exported) == set(reference)
    assert all(torch.equal(exported[k], reference[k]) for k in reference)
    assert json.loads((tmp_path / "export" / "config.json").read_text()) == json.loads(
        (FIXTURE / "config.json").read_text())


def _run(cfg, state, io, w, seed: int | None = None, sequence_parallel: bool = False):
    """Forward + backward of a fixed linear functional of the log-scores; (gathered out, hub-layout grads)."""
    from sedd_scale.checkpoint.hub import gather_hub_state, load_hub_state
    from sedd_scale.distributed import parallel
    from sedd_scale.model import SEDD

    model = SEDD(cfg, device="cpu", sequence_parallel=sequence_parallel)
    load_hub_state(model, state)
    model.train()
    if seed is not None:
        parallel.seed_parallel(seed)
    out = model(io["indices"], io["sigma"])
    start, local = model.vocab_start, out.shape[-1]
    w_local = torch.nn.functional.pad(w, (0, cfg.padded_vocab(parallel.tp_size()) - w.shape[-1]))
    w_local = w_local[..., start:start + local]
    finite = out.isfinite()
    (out.masked_fill(~finite, 0.0) * w_local).sum().backward()
    grads = {k: p.grad for k, p in model.named_parameters()}
    # Replicated parameters must get the same (full) gradient on every TP rank.
    rep_spread = max((parallel.gather_tp(g[None], dim=0) - g).abs().max().item()
                     for k, g in grads.items() if "norm" in k or "adaLN" in k or "sigma_map" in k)
    return parallel.gather_tp(out.detach()), gather_hub_state(model, grads), rep_spread


def tp_agreement() -> dict | None:
    """On 4 ranks: the same weights at TP=1, 2, 4 (DP = 4, 2, 1); rank 0 returns outputs and gradients."""
    from sedd_scale.distributed import parallel
    from sedd_scale.model import SEDD, ModelConfig

    io = fixture_io()
    cfg = ModelConfig(**TINY)
    state = random_hub_state(cfg, seed=3)
    w = torch.randn(4, 32, 51, generator=torch.Generator().manual_seed(4))
    result = {}
    for tp in (1, 2, 4):
        parallel.destroy_parallel()
        parallel.init_model_parallel(tp)
        plain = _run(cfg, state, io, w)
        parallel.seed_parallel(0)  # a fresh, seeded model: replicated weights equal on all TP ranks
        fresh = SEDD(cfg, device="cpu").named_parameters()
        init_spread = max((parallel.gather_tp(p.detach()[None], dim=0) - p.detach()).abs().max().item()
                          for k, p in fresh if "norm" in k or "adaLN" in k or "sigma_map" in k)
        # Residual-branch dropout draws from the default RNG, equal on all ranks: TP-invariant too.
        dropped = _run(ModelConfig(**{**TINY, "dropout": 0.3}), state, io, w, seed=11)
        # Attention dropout draws per TP rank from megatron's tracker: reproducible for a seed, and
        # activation checkpointing replays it exactly.
        full = {**TINY, "dropout": 0.3, "attention_dropout": 0.3}
        a = _run(ModelConfig(**full), state, io, w, seed=12)
        b = _run(ModelConfig(**full, activation_checkpointing=True), state, io, w, seed=12)
        c = _run(ModelConfig(**full), state, io, w, seed=13)
        # Sequence parallelism: the same outputs and gradients, replicated gradients summed over the shards.
        sp = _run(cfg, state, io, w, sequence_parallel=True) if tp > 1 else plain
        result[tp] = dict(out=plain[0], grads=plain[1], rep_spread=max(plain[2], dropped[2], a[2], sp[2]),
                          sp_out=sp[0], sp_grads=sp[1],
                          drop_out=dropped[0], drop_grads=dropped[1],
                          attn_same=torch.equal(a[0], b[0]),
                          attn_grad_dev=max((a[1][k] - b[1][k]).abs().max().item() for k in a[1]),
                          attn_seed_differs=not torch.equal(a[0], c[0]),
                          copy_to_grad=_copy_to_region_grad(), init_spread=init_spread)
    return _pack(result) if torch.distributed.get_rank() == 0 else None


def test_tp_sizes_agree_in_outputs_and_gradients():
    res = _unpack(launch(tp_agreement, 4)[0])
    base = res[1]
    assert sum(float(g.abs().sum()) > 0 for g in base["grads"].values()) == len(base["grads"])
    for tp in (1, 2, 4):
        r = res[tp]
        assert r["copy_to_grad"] == 1.0, f"TP={tp}: copy_to region backward lost its all-reduce"
        assert r["rep_spread"] == 0.0, f"TP={tp}: replicated gradients differ across ranks"
        assert r["init_spread"] == 0.0, f"TP={tp}: replicated initial weights differ across ranks"
        assert r["attn_same"] and r["attn_seed_differs"], tp
        assert r["attn_grad_dev"] < 1e-6, (tp, r["attn_grad_dev"])
        for key in ("out", "drop_out", "sp_out"):
            torch.testing.assert_close(r[key][..., :51], base[key][..., :51], rtol=1e-5, atol=1e-5)
        for key in ("grads", "drop_grads", "sp_grads"):
            for name, g in base[key].items():
                scale = float(g.abs().max())
                torch.testing.assert_close(r[key][name], g, rtol=1e-4, atol=1e-5 * max(scale, 1.0),
                                           msg=lambda m, n=name, t=tp: f"TP={t} {n}: {m}")
        out_dev = (r["out"][..., :51] - base["out"][..., :51]).abs().max().item()
        grad_dev = max(((r["grads"][n] - g).abs().max() / g.abs().max().clamp(min=1e-12)).item()
                       for n, g in base["grads"].items())
        print(f"TP={tp} vs TP=1: max |out diff| {out_dev:.3g}, max relative grad diff {grad_dev:.3g}")


def cp_agreement() -> dict | None:
    """On 4 ranks: the same weights at (TP, CP, SP) = (1, 1), (1, 2), (1, 4), (2, 2, SP); rank 0 returns outputs and
    gradients summed over the CP group (each CP rank differentiates its own chunk)."""
    import sedd_scale.compat  # noqa: F401  (before megatron-core / DeepSpeed)

    import deepspeed
    from megatron.core import parallel_state as ps

    from sedd_scale.distributed import parallel
    from sedd_scale.model import ModelConfig

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)  # Ulysses' all-to-alls go through deepspeed.comm
    io = fixture_io()
    cfg = ModelConfig(**TINY)
    state = random_hub_state(cfg, seed=3)
    w = torch.randn(4, 32, 51, generator=torch.Generator().manual_seed(4))
    result = {}
    for tp, cp, sp in ((1, 1, False), (1, 2, False), (1, 4, False), (2, 2, True)):
        parallel.destroy_parallel()
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
        out, grads, rep_spread = _run(cfg, state, io, w, sequence_parallel=sp)
        for name, g in grads.items():  # hub-layout (TP-gathered) gradients of this rank's chunk
            if name != "rotary_emb.inv_freq":  # the hub's rotary table rides along: not a gradient
                torch.distributed.all_reduce(g, group=ps.get_context_parallel_group())
        result[tp, cp, sp] = dict(out=out, grads=grads, rep_spread=rep_spread)
    parallel.destroy_parallel()
    return _pack(result) if torch.distributed.get_rank() == 0 else None


def test_context_parallel_sizes_agree_in_outputs_and_gradients():
    """DeepSpeed-Ulysses attention over CP 2 and 4, and CP 2 with TP 2 and sequence parallelism: the gathered
    log-scores and the gradients (summed over the chunks) equal CP 1's."""
    res = _unpack(launch(cp_agreement, 4)[0])
    base = res[1, 1, False]
    for key, r in res.items():
        assert r["rep_spread"] == 0.0, f"{key}: replicated gradients differ across TP ranks"
        torch.testing.assert_close(r["out"][..., :51], base["out"][..., :51], rtol=1e-5, atol=1e-5)
        for name, g in base["grads"].items():
            scale = float(g.abs().max())
            torch.testing.assert_close(r["grads"][name], g, rtol=1e-4, atol=1e-5 * max(scale, 1.0),
                                       msg=lambda m, n=name, k=key: f"{k} {n}: {m}")
