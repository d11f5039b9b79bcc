"""Exports are self-contained: the tokenizer (copied, checksummed), an honest config and a model card travel with the
weights through every conversion, and tools read them from any directory."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sedd_scale.apps import convert
from sedd_scale.checkpoint import bundle
from sedd_scale.checkpoint import consolidated as cons
from sedd_scale.checkpoint.hub import read_hub_config
from sedd_scale.model.config import ModelConfig
from tests.test_data_tokenizer import train_bpe
from tests.test_trainer import recipe_dict


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> Path:
    docs = [f"the {w} sat on the mat number {i}" for i, w in enumerate(["cat", "dog", "hen", "ox"] * 20)]
    return train_bpe(tmp_path_factory.mktemp("bpe") / "tokenizer.json", docs, 300, ["<pad>", "</s>"])


def _export(tmp_path: Path, bpe: Path, *, step: int = 130) -> Path:
    """A consolidated directory as `consolidate` writes it, for a model trained with the BPE tokenizer."""
    vocab = bundle.get_tokenizer(str(bpe)).vocab_size
    recipe = recipe_dict(str(tmp_path / "run"))
    recipe["model"]["num_tokens"] = vocab
    recipe["data"]["tokenizer"] = str(bpe)
    cfg = ModelConfig(**recipe["model"])
    gen = torch.Generator().manual_seed(0)
    weights = {k: 0.1 * torch.randn(s, generator=gen) for k, s in cons.expected_shapes(cfg).items()}
    last = {"step": 120, "elbo_nats_per_token": 2.5, "elbo_stderr": 0.01, "perplexity_bound": 12.18}
    provenance = {"source": "runs/x/step_000130", "step": step, "tokens_seen": step * 64,
                  "layout": {"tp": 2, "pp": 1, "dp": 2, "zero_stage": 1}, "recipe": recipe, "last_validation": last}
    return cons.write(tmp_path / "model", cfg, {"type": "loglinear", "eps": 1e-3}, weights, which="ema",
                      provenance=provenance, tokenizer=str(bpe))


def test_the_tokenizer_is_copied_checksummed_and_read_back(tmp_path, bpe, monkeypatch):
    own = tmp_path / "own" / "tokenizer.json"
    own.parent.mkdir()
    own.write_bytes(bpe.read_bytes())
    model = _export(tmp_path, own)
    assert (model / "tokenizer.json").read_bytes() == bpe.read_bytes()
    sums = (model / "SHA256SUMS").read_text()
    assert all(name in sums for name in ("tokenizer.json", "tokenizer_config.json", "README.md"))
    monkeypatch.chdir(tmp_path)
    own.unlink()  # the original is gone: the export alone must do
    ckpt = cons.open_consolidated(model)
    tok = bundle.tokenizer_for(model, ckpt.model.num_tokens)
    assert tok.decode(tok.encode("the cat sat")) == "the cat sat" and tok.eos_token == "</s>"

    data = bytearray((model / "tokenizer.json").read_bytes())
    data[len(data) // 2] ^= 0x01
    (model / "tokenizer.json").write_bytes(bytes(data))
    with pytest.raises(cons.ConsolidatedError, match="tokenizer.json is damaged"):
        cons.open_consolidated(model)


def test_model_card_states_the_training(tmp_path, bpe):
    card = (_export(tmp_path, bpe) / "README.md").read_text()
    assert "optimizer steps: 130" in card and "tokens seen: 8,320" in card
    assert "last validation ELBO (step 120): 2.5000 +- 0.0100 nats per token" in card
    assert "tokenizer: tokenizer.json" in card and "```yaml" in card


def test_hub_export_carries_the_bundle_and_an_honest_config(tmp_path, bpe):
    model = _export(tmp_path, bpe)
    hub_dir = convert.to_hub(model, tmp_path / "hub")
    for name in ("tokenizer.json", "tokenizer_config.json", "README.md"):
        assert (hub_dir / name).read_bytes() == (model / name).read_bytes(), name
    config = read_hub_config(hub_dir)
    assert config["ngpus"] == 4 and config["training"]["n_iters"] == 130 and config["training"]["batch_size"] == 8
    assert config["data"]["train"] == ["unused.json"] and "openwebtext" not in json.dumps(config)
    back = convert.from_hub(hub_dir, tmp_path / "back")  # and back again: still self-contained
    assert (back / "tokenizer.json").read_bytes() == (model / "tokenizer.json").read_bytes()
    assert bundle.tokenizer_for(back, cons.open_consolidated(back).model.num_tokens).eos_token == "</s>"


def test_unknown_training_is_left_out_not_invented(tmp_path):
    from tests.test_convert_formats import FIXTURE

    ours = convert.from_hub(FIXTURE, tmp_path / "ours")  # the reference's hub: its own config is kept as it was
    assert read_hub_config(convert.to_hub(ours, tmp_path / "hub")) == read_hub_config(FIXTURE)
    assert not (ours / "tokenizer_config.json").exists()  # 50 tokens: no tokenizer implied, none invented
    cfg = cons.open_consolidated(ours).model
    weights = dict(cons.open_consolidated(ours).weights())
    bare = cons.write(tmp_path / "bare", cfg, {"type": "loglinear", "eps": 1e-3}, weights, which="raw",
                      provenance={})  # nothing known of its training
    config = read_hub_config(convert.to_hub(bare, tmp_path / "bare-hub"))
    assert not {"ngpus", "training", "data", "optim", "eval"} & set(config) and config["tokens"] == cfg.num_tokens


def test_last_validation_is_read_from_the_run_metrics(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join([json.dumps({"step": 10, "loss": 3.0}),
                                  json.dumps({"step": 20, "valid/elbo_nats_per_token": 2.9, "valid/elbo_stderr": 0.1}),
                                  json.dumps({"step": 40, "valid/elbo_nats_per_token": 2.7, "valid/elbo_stderr": 0.1}),
                                  '{"step": 50, "valid/elbo_nats'])  # a record cut short
                       + "\n")
    assert convert.last_validation(metrics, 30) == {"step": 20, "elbo_nats_per_token": 2.9, "elbo_stderr": 0.1}
    assert convert.last_validation(metrics, 60)["step"] == 40
    assert convert.last_validation(tmp_path / "absent.jsonl", 60) is None


def test_prefix_and_template_work_with_a_bundled_tokenizer_json(tmp_path, bpe, monkeypatch, release_process_group):
    """Text conditioning through a model's own tokenizer.json, from another directory (the API and sample.py)."""
    from sedd_scale.apps.api import load_model
    from sedd_scale.apps.generation import build_conditioning, choose_tokenizer

    model_dir = _export(tmp_path, bpe)
    monkeypatch.chdir(tmp_path)  # the tokenizer comes from the model directory, not a path relative to here
    tok = choose_tokenizer("auto", bundle.get_tokenizer(str(bpe)).vocab_size, model_dir)
    cond = build_conditioning(tok, model_length=8, template="the[BLANK:2] sat", blank_len=2)
    given = [t for t in cond.given if t is not None]
    assert tok.decode(given) == "the sat" and cond.given.count(None) == 2
    model = load_model(model_dir, device="cpu")
    texts = model.generate(2, steps=4, prefix="the cat", length=8, seed=0)
    assert all(t.startswith("the cat") for t in texts)
    texts = model.generate(1, steps=4, template="the[BLANK:2] sat", seed=0)
    assert texts[0].startswith("the") and texts[0].endswith(" sat")


def test_a_denoiser_card_says_its_output_is_not_log_ratios(tmp_path):
    """The model card of a masked_ce (denoiser) export warns that the reference code would misread it; a ratios
    model's card does not."""
    from sedd_scale.checkpoint.bundle import CARD_FILE, write_card

    for parametrization, warned in (("denoiser", True), ("ratios", False)):
        folder = tmp_path / parametrization
        folder.mkdir()
        write_card(folder, name="m", graph="absorb", parameters=1, provenance={}, tokenizer=None,
                   config={"n_blocks": 1, "hidden_size": 8, "parametrization": parametrization})
        card = (folder / CARD_FILE).read_text()
        assert ("would misread this model" in card) == warned and ("masked_ce" in card) == warned
