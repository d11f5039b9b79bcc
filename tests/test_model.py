"""The SEDD transformer on one process: reference-fixture parity, hub round trip, strict loading, sizes.

The oracle is the fixture made with the unmodified reference code (tests/fixtures/sedd_reference/
model_absorb, see its README.txt): outputs, intermediate activations, and its exact parameter count.
"""
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sedd_scale.checkpoint.hub import (
    HubFormatError,
    hub_config,
    hub_shapes,
    model_config_from_hub,
    read_hub,
    save_hub,
    write_hub,
)
from sedd_scale.distributed import parallel
from sedd_scale.model import SEDD, ModelConfig, preset, rotary
from sedd_scale.pretrained import load_pretrained

pytestmark = pytest.mark.megatron  # rerun under megatron-core 0.19.x by tools/test.sh

FIXTURE = Path(__file__).parent / "fixtures" / "sedd_reference" / "model_absorb"
ATOL = 1e-5


def fixture_io() -> dict[str, torch.Tensor]:
    """The fixture's input batch, outputs and activations."""
    return load_file(str(FIXTURE / "io.safetensors"))


def expected_raw_scores(io: dict[str, torch.Tensor]) -> torch.Tensor:
    """Log-scores without the absorb shift: the reference's final-layer output with 0 at the current token."""
    raw = io["act/output_layer"].clone()
    return raw.scatter(-1, io["indices"][..., None], 0.0)


def random_hub_state(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """A full hub state dict with every tensor random (no zero adaLN), so all gradients are non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in hub_shapes(cfg).items():
        t = torch.randn(shape, generator=gen) / math.sqrt(shape[-1])
        state[key] = 1.0 + 0.1 * t if "norm" in key else t
    state["rotary_emb.inv_freq"] = rotary.inv_freq(cfg.head_dim, cfg.rotary_base)
    return state


# ---------------------------------------------------------------------------------------------
# Sizes
@pytest.mark.parametrize("name, count", [("small", 169_627_218), ("medium", 424_477_010)])
def test_reference_parameter_counts(tp1, name, count):
    cfg = preset(name, vocab_multiple=1)
    assert cfg.num_params(tp_size=1) == count
    with torch.device("meta"):  # the real modules, without allocating them
        model = SEDD(cfg, device="meta")
    assert sum(p.numel() for p in model.parameters()) == count


def test_fixture_parameter_count_and_padding(tp1):
    hub_cfg, state = read_hub(FIXTURE)
    cfg = model_config_from_hub(hub_cfg, vocab_multiple=1)
    assert cfg.num_params() == sum(t.numel() for k, t in state.items() if k != "rotary_emb.inv_freq") == 144_691
    assert ModelConfig(vocab_multiple=128).padded_vocab(2) == 50432
    assert ModelConfig(vocab_multiple=1).padded_vocab(4) == 50260
    model = SEDD(model_config_from_hub(hub_cfg, vocab_multiple=8), device="cpu")
    assert model.output_layer.linear.weight.shape == (56, 64)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params() + 5 * 64 * 2 + 5


def test_presets_and_config_errors():
    assert 1.2e9 < preset("1.3b").num_params() < 1.4e9 and 6.5e9 < preset("7b").num_params() < 7.5e9
    with pytest.raises(ValueError, match="scale_by_sigma must be false"):
        ModelConfig(graph="uniform")
    assert preset("tiny", graph="uniform").vocab_size == 50257
    with pytest.raises(ValueError, match="not divisible by n_heads"):
        ModelConfig(hidden_size=100, n_heads=12)
    with pytest.raises(ValueError, match="precision"):
        ModelConfig(precision="fp16")
    with pytest.raises(ValueError, match="unknown model preset"):
        preset("huge")
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        preset("tiny", hiden_size=3)
    with pytest.raises(ValueError, match=r"does not divide n_heads=12: choose one of \[1, 2, 3, 4, 6, 12\]"):
        ModelConfig().check_tp(8)


# ---------------------------------------------------------------------------------------------
# Reference parity
def test_fixture_parity_absorb(tp1):
    io = fixture_io()
    model, graph, noise = load_pretrained(FIXTURE, tp_size=1, vocab_multiple=1)
    assert type(graph).__name__ == "Absorbing" and graph.dim == 51 and type(noise).__name__ == "LogLinearNoise"
    assert not model.training
    with torch.no_grad():
        x, c = model.input_layer(io["indices"], io["sigma"])  # the network runs sequence-first inside
        torch.testing.assert_close(x.transpose(0, 1), io["act/embed"], rtol=0, atol=0)
        torch.testing.assert_close(c, io["act/c_silu"], rtol=0, atol=1e-6)
        for i, block in enumerate(model.blocks):
            x, c = block(x, c)
            torch.testing.assert_close(x.transpose(0, 1), io[f"act/block{i}"], rtol=ATOL, atol=ATOL)
        torch.testing.assert_close(model.output_layer(x, c), io["act/output_layer"], rtol=ATOL, atol=ATOL)
        out = model(io["indices"], io["sigma"])
    assert out.shape == io["output_f32"].shape and out.dtype == torch.float32
    torch.testing.assert_close(out, io["output_f32"], rtol=ATOL, atol=ATOL)
    print(f"TP=1 max |out - output_f32| = {(out - io['output_f32']).abs().max().item():.3g}")


def test_fixture_parity_padded_vocab_and_no_sigma_scaling(tp1):
    io = fixture_io()
    model, _, _ = load_pretrained(FIXTURE, tp_size=1, vocab_multiple=128, scale_by_sigma=False)
    with torch.no_grad():
        out = model(io["indices"], io["sigma"])
    assert out.shape == (4, 32, 128)
    torch.testing.assert_close(out[..., :51], expected_raw_scores(io), rtol=ATOL, atol=ATOL)
    assert bool((out[..., 51:] == float("-inf")).all())


def test_fixture_weights_as_uniform_graph(tp1, tmp_path):
    # The same weights read as a uniform model over 51 tokens (V = N = 51: identical shapes) compute the
    # same network; uniform has no sigma shift, so the expected output is the raw final layer's.
    io = fixture_io()
    hub_cfg, state = read_hub(FIXTURE)
    hub_cfg = {**hub_cfg, "tokens": 51, "graph": {"type": "uniform"}, "noise": {"type": "geometric"},
               "model": {**hub_cfg["model"], "scale_by_sigma": False}}
    model, graph, noise = load_pretrained(write_hub(tmp_path / "uniform", hub_cfg, state), vocab_multiple=1)
    assert type(graph).__name__ == "Uniform" and graph.dim == 51
    assert (noise.sigma_min, noise.sigma_max) == (1e-4, 20.0)
    with torch.no_grad():
        out = model(io["indices"], io["sigma"])
    torch.testing.assert_close(out, expected_raw_scores(io), rtol=ATOL, atol=ATOL)


def test_bf16_modes_track_the_reference(tp1):
    io = fixture_io()
    for precision in ("bf16-mixed", "bf16"):
        model, _, _ = load_pretrained(FIXTURE, tp_size=1, vocab_multiple=1, precision=precision)
        out = model(io["indices"], io["sigma"])  # eval mode (no dropout), gradients still recorded
        # The fixture's bf16 output is a rough CPU-autocast stand-in for the reference's GPU run.
        dev = (out - io["output_bf16_cpu_autocast_rough"]).abs().max().item()
        assert out.dtype == torch.float32 and dev < 0.1, (precision, dev)
        assert (out - io["output_f32"]).abs().max().item() < 0.1
        print(f"{precision}: max |out - output_bf16_cpu_autocast_rough| = {dev:.3g}")
        out.masked_fill(io["indices"][..., None] == 50, 0.0).sum().backward()
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None and bool(g.isfinite().all()) for g in grads)
        assert model.blocks[0].norm1.weight.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)


def test_untrained_network_outputs_the_uniform_prior(tp1):
    # adaLN-zero: a fresh network's raw output is exactly 0, so log s = -log(e^sigma - 1) - log N.
    torch.manual_seed(0)
    cfg = preset("tiny", num_tokens=50, vocab_multiple=1)
    model = SEDD(cfg, device="cpu")
    io = fixture_io()
    with torch.no_grad():
        out = model(io["indices"], io["sigma"]).double()
    sigma = io["sigma"].double()
    shift = (torch.log(torch.expm1(sigma)) + math.log(50))[:, None, None].expand_as(out)
    expected = shift.neg().scatter(-1, io["indices"][..., None], 0.0)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Hub format
def test_hub_round_trip_is_identical(tp1, tmp_path):
    hub_cfg, state = read_hub(FIXTURE)
    model, _, _ = load_pretrained(FIXTURE, tp_size=1)  # padded to 128 inside, unpadded on export
    save_hub(model, tmp_path / "out", hub_cfg)
    cfg2, state2 = read_hub(tmp_path / "out")
    assert cfg2 == hub_cfg
    assert (tmp_path / "out" / "config.json").read_bytes() == (FIXTURE / "config.json").read_bytes()
    assert set(state2) == set(state)
    for k in state:
        assert state2[k].dtype == state[k].dtype and torch.equal(state2[k], state[k]), k
    # A config built from the model alone has the reference's keys (and here, its default values).
    built = hub_config(model.config, noise={"type": "loglinear"})
    assert json.dumps(built, indent=2) == json.dumps(hub_cfg, indent=2)
    assert model_config_from_hub(built, vocab_multiple=128) == model.config
    geometric = hub_config(preset("small", graph="uniform"), noise={"type": "geometric", "sigma_max": 10})
    assert geometric["noise"] == {"type": "geometric", "sigma_min": 0.0001, "sigma_max": 10}
    assert (geometric["tokens"], geometric["graph"]["type"], geometric["model"]["scale_by_sigma"]) == (
        50257, "uniform", False)
    with pytest.raises(HubFormatError, match="disagrees"):
        save_hub(model, tmp_path / "bad", {**hub_cfg, "tokens": 49})


def test_strict_loading_lists_every_problem(tp1, tmp_path):
    hub_cfg, state = read_hub(FIXTURE)
    bad = dict(state)
    del bad["blocks.1.mlp.0.bias"], bad["sigma_map.mlp.2.weight"]
    bad["blocks.0.extra.weight"] = torch.zeros(3)
    bad["blocks.0.attn_out.weight"] = torch.zeros(64, 65)
    with pytest.raises(HubFormatError) as err:
        load_pretrained(write_hub(tmp_path / "bad", hub_cfg, bad))
    msg = str(err.value)
    for part in ("missing keys (2)", "blocks.1.mlp.0.bias", "sigma_map.mlp.2.weight", "unexpected keys (1)",
                 "blocks.0.extra.weight", "mis-shaped keys (1)", "blocks.0.attn_out.weight: (64, 65)"):
        assert part in msg, (part, msg)

    freq = dict(state, **{"rotary_emb.inv_freq": state["rotary_emb.inv_freq"] * 1.01})
    with pytest.raises(HubFormatError, match="rotary_base"):
        load_pretrained(write_hub(tmp_path / "freq", hub_cfg, freq))

    no_heads = {**hub_cfg, "model": {k: v for k, v in hub_cfg["model"].items() if k != "n_heads"}}
    with pytest.raises(HubFormatError, match=r"lacks \['model.n_heads'\]"):
        load_pretrained(write_hub(tmp_path / "cfg", no_heads, state))

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="lacks"):
        load_pretrained(tmp_path / "empty")

    model, _, _ = load_pretrained(FIXTURE)
    io = fixture_io()
    with pytest.raises(ValueError, match="int64"):
        model(io["indices"].int(), io["sigma"])
    with pytest.raises(ValueError, match="total_noise must have shape"):
        model(io["indices"], io["sigma"][:2])

    with pytest.raises(ValueError, match="world size 1 is not divisible"):
        load_pretrained(FIXTURE, tp_size=2)


# ---------------------------------------------------------------------------------------------
# Training-time options (one process; TP agreement is in test_model_tp.py)
def _grads_with_dropout(cfg: ModelConfig, state, io, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    from sedd_scale.checkpoint.hub import load_hub_state

    model = SEDD(cfg, device="cpu")
    load_hub_state(model, state)
    model.train()
    parallel.seed_parallel(seed)
    out = model(io["indices"], io["sigma"])
    out[..., : cfg.vocab_size].sum().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


def test_activation_checkpointing_and_dropout_reproducibility(tp1):
    io = fixture_io()
    base = preset("tiny", hidden_size=64, n_heads=4, n_blocks=2, cond_dim=32, num_tokens=50, vocab_multiple=1,
                  dropout=0.3, attention_dropout=0.2)
    state = random_hub_state(base, seed=1)
    out_a, grads_a = _grads_with_dropout(base, state, io, seed=7)
    out_b, grads_b = _grads_with_dropout(base, state, io, seed=7)
    out_c, grads_c = _grads_with_dropout(
        ModelConfig(**{**base.__dict__, "activation_checkpointing": True}), state, io, seed=7)
    out_d, _ = _grads_with_dropout(base, state, io, seed=8)
    assert torch.equal(out_a, out_b) and all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
    torch.testing.assert_close(out_c, out_a, rtol=0, atol=0)
    for a, c in zip(grads_a, grads_c):  # recomputation replays the same dropout masks
        torch.testing.assert_close(c, a, rtol=1e-6, atol=1e-6)
    assert not torch.equal(out_a, out_d)
