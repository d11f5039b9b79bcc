"""tools/sample.py and sedd_scale.apps.generation: conditioning, layout-independent samples, metrics, bad input.

A tiny random byte-vocabulary SEDD (257 tokens, absorbing MASK = 257) is sampled by the real CLI
in one process, under torchrun with DP=2 and with TP=2; samples must be identical. Generative
perplexity is checked against a float64 log-softmax over a tiny random GPT-2's logits.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from sedd_scale.apps.generation import (
    CausalLMScorer,
    GenerationError,
    batch_plan,
    batch_seed,
    build_conditioning,
    parse_template,
    perplexity_summary,
)
from sedd_scale.data.tokenizer import ByteTokenizer
from sedd_scale.diffusion.sampling import unigram_entropy
from sedd_scale.model.config import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "sample.py"
FIXTURE = ROOT / "tests" / "fixtures" / "sedd_reference" / "model_absorb"
MODEL = dict(hidden_size=32, n_heads=2, n_blocks=1, cond_dim=16, num_tokens=257, length=32, dropout=0.0,
             vocab_multiple=1, name="byte-tiny")
MASK = 257  # absorbing graph: the MASK id is the vocabulary size
TEMPLATE, BLANK_LEN, LENGTH = "The[BLANK] sat on[BLANK:3] mat.", 4, 30
RUN = ["--num-samples", "8", "--batch-size", "2", "--steps", "12", "--template", TEMPLATE, "--blank-len",
       str(BLANK_LEN), "--length", str(LENGTH), "--seed", "7"]


def expected_template() -> list[int | None]:
    """The template laid out by hand: bytes of each piece, None at blanks and after the template."""
    layout = [*b"The", *[None] * BLANK_LEN, *b" sat on", *[None] * 3, *b" mat."]
    return layout + [None] * (LENGTH - len(layout))


def cli(*args: str, procs: int = 1, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """tools/sample.py in a fresh process (or `procs` under torchrun), one thread each (reproducible matmuls)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    launcher = [sys.executable] if procs == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                    "--standalone", "--nproc-per-node", str(procs)]
    return subprocess.run([*launcher, str(TOOL), *args], capture_output=True, text=True, env=env, timeout=240,
                          cwd=cwd)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def byte_ckpt(tmp_path_factory) -> Path:
    """A hub checkpoint of a random byte-vocabulary SEDD (every weight random, so scores are not flat)."""
    from sedd_scale.checkpoint.hub import hub_config, write_hub
    from tests.test_model import random_hub_state

    cfg = ModelConfig(**MODEL)
    return write_hub(tmp_path_factory.mktemp("ckpt") / "byte", hub_config(cfg, noise={"type": "loglinear"}),
                     random_hub_state(cfg, seed=3))


def tiny_gpt2(path: Path, vocab: int, n_positions: int = 64, seed: int = 0) -> Path:
    """A random 1-layer GPT-2 saved with save_pretrained (no tokenizer files)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=vocab, n_positions=n_positions,
                               bos_token_id=0, eos_token_id=0)).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def scorer_dir(tmp_path_factory) -> Path:
    """A GPT-2 over the byte vocabulary (257 tokens, no tokenizer): samples are scored as ids."""
    return tiny_gpt2(tmp_path_factory.mktemp("scorer") / "gpt2", vocab=257)


@pytest.fixture(scope="module")
def baseline(byte_ckpt, scorer_dir, tmp_path_factory) -> tuple[list[dict], dict]:
    """One process, TP=1: the JSONL records and the summary."""
    out = tmp_path_factory.mktemp("run") / "samples.jsonl"
    proc = cli(str(byte_ckpt), "--out", str(out), "--gen-ppl-model", str(scorer_dir), *RUN)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "unigram entropy" in proc.stdout and "gen ppl" in proc.stdout
    return read_jsonl(out), json.loads((out.parent / "samples.summary.json").read_text())


# ---------------------------------------------------------------------------------------------
# Conditioning
def test_template_positions_hold_the_given_ids(baseline):
    records, summary = baseline
    template = expected_template()
    assert [r["index"] for r in records] == list(range(8)) and summary["num_samples"] == 8
    free = [i for i, t in enumerate(template) if t is None]
    generated = set()
    for rec in records:
        ids = rec["ids"]
        assert len(ids) == LENGTH
        assert [ids[i] for i, t in enumerate(template) if t is not None] == [t for t in template if t is not None]
        assert all(0 <= ids[i] < MASK for i in free), ids  # a real byte token, never MASK
        assert rec["text"] == ByteTokenizer().decode(ids)
        generated.add(tuple(ids[i] for i in free))
        assert rec["conditioning"]["given_ranges"] == [[0, 3], [7, 14], [17, 22]]
    assert len(generated) == 8, "different batches/rows must not repeat the same draw"


def test_conditioning_builder_and_template_syntax():
    tok = ByteTokenizer()
    assert parse_template("a [BLANK:2] b [BLANK]", blank_len=5) == ["a ", 2, " b ", 5]
    cond = build_conditioning(tok, model_length=24, template=TEMPLATE, blank_len=BLANK_LEN)
    assert cond.length == 22 and cond.given == expected_template()[:22]  # no --length: the template's own
    cond = build_conditioning(tok, model_length=10, prefix="ab", suffix="z")
    assert cond.given == [97, 98, *[None] * 7, 122] and cond.record()["given_ranges"] == [[0, 2], [9, 10]]
    assert build_conditioning(None, model_length=6).infill is None
    with pytest.raises(GenerationError, match="malformed blank"):
        parse_template("x [BLANK:y]", 3)
    with pytest.raises(GenerationError, match="nothing is left to generate"):
        build_conditioning(tok, model_length=3, template="abc")
    with pytest.raises(GenerationError, match="cannot be combined"):
        build_conditioning(tok, model_length=9, template="a[BLANK]", prefix="b")


@pytest.mark.megatron
def test_prefix_suffix_infill_and_dp_split_in_process(tp1, byte_ckpt):
    from sedd_scale.apps.generation import generate_batches, model_log_score_fn, sample_records
    from sedd_scale.pretrained import load_pretrained

    model, graph, noise = load_pretrained(byte_ckpt, device="cpu")
    cond = build_conditioning(ByteTokenizer(), model_length=model.config.length, prefix="Once ", suffix=" end.")
    plan = batch_plan(5, 2)
    assert plan == [(0, 2), (2, 2), (4, 1)]
    kwargs = dict(plan=plan, length=cond.length, steps=8, predictor="euler", seed=1, infill=cond.infill)
    whole = generate_batches(model_log_score_fn(model), graph, noise, **kwargs)
    halves = [generate_batches(model_log_score_fn(model), graph, noise, dp_rank=r, dp_size=2, **kwargs)
              for r in range(2)]
    assert sorted(halves[0]) == [0, 2] and sorted(halves[1]) == [1]
    for b, x in whole.items():
        assert torch.equal(x, {**halves[0], **halves[1]}[b])
    ids = torch.cat([whole[b] for b in range(3)])
    assert ids.shape == (5, 32)
    assert ids[:, :5].tolist() == [list(b"Once ")] * 5 and ids[:, -5:].tolist() == [list(b" end.")] * 5
    assert int(ids.min()) >= 0 and int(ids.max()) < MASK
    assert batch_seed(1, 0) != batch_seed(1, 1) != batch_seed(2, 0)

    # The reference fixture (50 tokens): no tokenizer is inferred, records carry ids only.
    model, graph, noise = load_pretrained(FIXTURE, device="cpu")
    cond = build_conditioning(None, model_length=model.config.length)
    x = generate_batches(model_log_score_fn(model), graph, noise, plan=batch_plan(2, 2), length=cond.length,
                         steps=4, predictor="analytic", seed=0)[0]
    assert x.shape == (2, 32) and int(x.max()) < 50  # MASK (50) never survives the denoiser
    rec = sample_records(x, cond, None, unigram_entropy(x))[0]
    assert "text" not in rec and rec["conditioning"] == {"type": "unconditional", "given_ranges": []}


@pytest.mark.megatron
def test_fast_samplers_keep_the_conditioning_and_count_their_evaluations(tp1, byte_ckpt):
    """Every registered fast sampler through generate_batches on the random model: given tokens kept, no MASK left,
    NFE within each one's budget, and the same samples for any DP split."""
    from sedd_scale.apps.generation import collect_nfe, generate_batches, model_log_score_fn
    from sedd_scale.diffusion.samplers import parse_sampler
    from sedd_scale.pretrained import load_pretrained

    model, graph, noise = load_pretrained(byte_ckpt, device="cpu")
    cond = build_conditioning(ByteTokenizer(), model_length=model.config.length, prefix="Once ", suffix=" end.")
    plan, steps = batch_plan(3, 2), 12
    budget = {"cached": steps + 1, "confidence:threshold=0.5": steps, "block:size=8,inner=confidence": steps,
              "block:size=16,inner=cached": steps + 2}  # + the final denoise (of each block)
    for spec, most in budget.items():
        kwargs = dict(plan=plan, length=cond.length, steps=steps, seed=1, infill=cond.infill,
                      sampler=parse_sampler(spec))
        nfe: dict[int, float] = {}
        whole = generate_batches(model_log_score_fn(model), graph, noise, nfe=nfe, **kwargs)
        ids = torch.cat([whole[b] for b in range(2)])
        assert ids[:, :5].tolist() == [list(b"Once ")] * 3 and ids[:, -5:].tolist() == [list(b" end.")] * 3, spec
        assert int(ids.max()) < MASK, spec
        assert sorted(nfe) == [0, 1] and 0 < collect_nfe(nfe, plan) <= most, (spec, nfe)
        half = generate_batches(model_log_score_fn(model), graph, noise, dp_rank=1, dp_size=2, **kwargs)
        assert torch.equal(half[1], whole[1]), spec


def test_without_out_every_sample_is_printed_and_nothing_is_written(baseline, byte_ckpt, tmp_path):
    proc = cli(str(byte_ckpt), *RUN, cwd=tmp_path)  # the README's form: no --out
    assert proc.returncode == 0, proc.stderr[-3000:]
    records, _ = baseline
    for rec in records:  # all 8 samples (not --show's 2), the same ones --out writes
        assert f"--- sample {rec['index']} ---\n{rec['text']}\n" in proc.stdout, proc.stdout
    assert "unigram entropy" in proc.stdout and "wrote" not in proc.stdout
    assert list(tmp_path.iterdir()) == []
    assert "sampling" not in proc.stderr  # no progress bar where nobody watches (CI logs)
    proc = cli(str(byte_ckpt), "--num-samples", "2", "--steps", "2", "--length", str(LENGTH), "--tokenizer", "none",
               "--show", "1", "--summary", str(tmp_path / "s.json"), env={"SEDD_PROGRESS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]  # ids are printed without a tokenizer; the bar when asked
    assert re.search(r"sampling: 100%.*1/1 \[", proc.stderr), proc.stderr[-2000:]
    assert re.search(r"--- sample 0 ---\n\[\d+(, \d+){29}\]\n", proc.stdout) and "--- sample 1 ---" not in proc.stdout
    assert f"wrote {tmp_path / 's.json'}" in proc.stdout and [p.name for p in tmp_path.iterdir()] == ["s.json"]
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["sampler"] == "analytic" and summary["predictor"] == "analytic" and summary["nfe_per_sequence"] == 3
    proc = cli(str(byte_ckpt), "--num-samples", "2", "--steps", "4", "--length", str(LENGTH), "--tokenizer", "none",
               "--sampler", "block:size=10,inner=cached", "--predictor", "euler", "--sampler-option", "size=15",
               "--summary", str(tmp_path / "s.json"), "--overwrite")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["sampler"] == "block:size=15,inner=cached,predictor=euler" and summary["predictor"] is None
    assert 2 <= summary["nfe_per_sequence"] <= 6 and "network evals" in proc.stdout  # 2 blocks x (2 steps + denoise)


# ---------------------------------------------------------------------------------------------
# Layout independence (real processes, gloo)
@pytest.mark.slow
@pytest.mark.megatron
@pytest.mark.parametrize("layout", [["--tp", "1"], ["--tp", "2"]], ids=["dp2", "tp2"])
def test_samples_do_not_depend_on_the_layout(baseline, byte_ckpt, scorer_dir, tmp_path, layout):
    out = tmp_path / "samples.jsonl"
    proc = cli(str(byte_ckpt), "--out", str(out), "--gen-ppl-model", str(scorer_dir), *RUN, *layout, procs=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records, summary = read_jsonl(out), json.loads((tmp_path / "samples.summary.json").read_text())
    tp = int(layout[1])
    assert (summary["world_size"], summary["tp"], summary["dp"]) == (2, tp, 2 // tp)
    # Exact equality: batch b draws from the generator of (seed, b) wherever it runs, and at TP=2 the
    # gathered log-scores were close enough to TP=1's that no categorical draw flipped.
    assert [r["ids"] for r in records] == [r["ids"] for r in baseline[0]]
    assert summary["gen_ppl"] == pytest.approx(baseline[1]["gen_ppl"], rel=1e-12)


# ---------------------------------------------------------------------------------------------
# Metrics
def test_unigram_entropy_by_hand(baseline):
    h = unigram_entropy(torch.tensor([[1, 1, 2, 3], [5, 5, 5, 5], [0, 1, 2, 3]]))
    expected = [-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)), 0.0, math.log(4)]
    torch.testing.assert_close(h, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    records, summary = baseline
    by_hand = []
    for rec in records:
        counts = Counter(rec["ids"])
        by_hand.append(-sum(c / LENGTH * math.log(c / LENGTH) for c in counts.values()))
        assert rec["unigram_entropy"] == pytest.approx(by_hand[-1], rel=1e-12)
    assert summary["unigram_entropy"] == pytest.approx(sum(by_hand) / len(by_hand), rel=1e-12)


def float64_nll(model, seqs: list[list[int]]) -> list[list[float]]:
    """Next-token NLL per position, from each sequence alone, by a manual float64 log-softmax."""
    out = []
    with torch.no_grad():
        for seq in seqs:
            ids = torch.tensor([seq])
            z = model(input_ids=ids).logits[0, :-1].to(torch.float64)
            m = z.max(-1, keepdim=True).values
            log_p = z - (m + (z - m).exp().sum(-1, keepdim=True).log())
            out.append((-log_p.gather(-1, ids[0, 1:, None])[:, 0]).tolist())
    return out


def test_generative_perplexity_matches_a_float64_oracle(baseline, scorer_dir):
    from transformers import GPT2LMHeadModel

    records, summary = baseline
    nll = float64_nll(GPT2LMHeadModel.from_pretrained(str(scorer_dir)).eval(), [r["ids"] for r in records])
    per_sample = [math.exp(sum(n) / len(n)) for n in nll]
    assert summary["gen_ppl_mode"] == "ids" and summary["gen_ppl_scored_tokens"] == 8 * (LENGTH - 1)
    for rec, ppl in zip(records, per_sample):
        assert rec["gen_ppl"] == pytest.approx(ppl, rel=1e-5)
    assert summary["gen_ppl"] == pytest.approx(sum(per_sample) / 8, rel=1e-5)
    total = sum(sum(n) for n in nll) / (8 * (LENGTH - 1))
    assert summary["gen_ppl_token"] == pytest.approx(math.exp(total), rel=1e-5)
    assert summary["gen_ppl"] != pytest.approx(summary["gen_ppl_token"], rel=1e-9)  # two different averages
    assert perplexity_summary(torch.tensor([2.0, 6.0]), torch.tensor([2, 2]))["gen_ppl"] == pytest.approx(
        (math.e + math.e**3) / 2)


def test_retokenised_scoring_matches_a_float64_oracle(tmp_path):
    """A scorer with its own (byte-level BPE, no merges) tokenizer: our ids are decoded and re-encoded,
    padded in batches and truncated to its 40-token context."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

    path = tiny_gpt2(tmp_path / "scorer", vocab=300, n_positions=40, seed=1)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    hf = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    hf.pre_tokenizer, hf.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=hf).save_pretrained(str(path))

    ours = ByteTokenizer()
    gen = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.randint(32, 127, (5, 30), generator=gen),  # ASCII: 30 scorer tokens
                     torch.randint(128, 256, (5, 30), generator=gen)])  # invalid UTF-8: U+FFFD = 3 bytes each
    scorer = CausalLMScorer(path, tokenizer=ours, num_tokens=257, batch_size=3)
    assert scorer.mode == "text" and scorer.context == 40
    nll, counts, notes = scorer.score(ids)

    tok = scorer.hf_tokenizer
    seqs = [tok(ours.decode(row.tolist()), add_special_tokens=False)["input_ids"] for row in ids]
    assert notes["truncated"] == sum(len(s) > 40 for s in seqs) >= 5
    oracle = float64_nll(GPT2LMHeadModel.from_pretrained(str(path)).eval(), [s[:40] for s in seqs])
    assert counts.tolist() == [len(n) for n in oracle]
    torch.testing.assert_close(nll, torch.tensor([sum(n) for n in oracle], dtype=torch.float64), rtol=1e-5, atol=0)

    with pytest.raises(GenerationError, match="ids cannot be scored directly"):
        CausalLMScorer(path, tokenizer=ours, num_tokens=301, mode="ids", load_weights=False)


# ---------------------------------------------------------------------------------------------
# Bad input: exit code 2 before any work
@pytest.fixture(scope="module")
def tool():
    return importlib.import_module("sedd_scale.cli.sample")


def test_missing_checkpoint_exits_2_without_writing(tmp_path):
    out = tmp_path / "s.jsonl"
    proc = cli(str(tmp_path / "nope"), "--out", str(out))
    assert proc.returncode == 2 and "checkpoint directory" in proc.stderr and "does not exist" in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("extra, env, message", [
    (["--template", "[BLANK:25] tail", "--length", "20"], {}, r"template is 30 tokens but --length is 20"),
    (["--prefix", "x" * 20, "--suffix", "y" * 20], {}, r"--prefix \(20 tokens\) \+ --suffix \(20 tokens\) exceed "
                                                       r"the length 32"),
    (["--tp", "2"], {}, r"--tp 2 does not divide the world size 1: launch a multiple of 2"),
    (["--tp", "4"], {"WORLD_SIZE": "4"}, r"--tp 4 does not divide the model's 2 attention heads: use --tp in \[1, 2\]"),
    (["--tokenizer", "none", "--prefix", "hi"], {}, r"text conditioning needs a tokenizer"),
    (["--tokenizer", "gpt2"], {}, r"tokenizer gpt2 has 50257 tokens but the model has 257"),
    (["--gen-ppl-model", "/nonexistent/gpt2-large"], {}, r"not a local Hugging Face model directory"),
    (["--steps", "0"], {}, r"--steps must be >= 1"),
    (["--eps", "1.0"], {}, r"--eps must be in \(0, 1\)"),
    (["--sampler", "ddim"], {}, r"--sampler: unknown sampler 'ddim'; choose one of \['analytic', 'block'"),
    (["--sampler", "confidence", "--sampler-option", "top_k"], {}, r"--sampler-option 'top_k' is not KEY=VALUE"),
    (["--sampler", "confidence", "--predictor", "euler"], {}, r"sampler 'confidence' has no option 'predictor'"),
    (["--length", "33"], {}, r"--length is 33 tokens, longer than the model's training length 32 \(model.length\): "
                             r"pass --length <= 32 .* or --extrapolate"),
    (["--template", "[BLANK:30] and more"], {}, r"the template is 39 tokens, longer than the model's training "
                                                r"length 32"),
], ids=["template", "prefix-suffix", "tp-world", "tp-heads", "no-tokenizer", "tokenizer-vocab", "scorer", "steps",
        "eps", "sampler", "sampler-option", "sampler-predictor", "length-past-training", "template-past-training"])
def test_bad_input_exits_2_before_work(tool, byte_ckpt, tmp_path, capsys, monkeypatch, extra, env, message):
    import torch.distributed as dist

    for key in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    was_initialized = dist.is_initialized()
    out = tmp_path / "s.jsonl"
    assert tool.main([str(byte_ckpt), "--out", str(out), *extra]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists() and dist.is_initialized() == was_initialized  # no process group, no file


def test_existing_output_is_kept_without_overwrite(tool, byte_ckpt, tmp_path, capsys):
    out = tmp_path / "s.jsonl"
    out.write_text("keep me\n")
    assert tool.main([str(byte_ckpt), "--out", str(out)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err and out.read_text() == "keep me\n"
    summary = tmp_path / "s.summary.json"
    out.unlink()
    summary.write_text("{}")
    assert tool.main([str(byte_ckpt), "--out", str(out)]) == 2 and summary.read_text() == "{}"


def test_past_the_training_length_is_refused_and_existing_files_are_kept(tool, byte_ckpt, tmp_path, capsys):
    """Even with --overwrite, a refused request leaves an existing --out and summary as they were."""
    out, summary = tmp_path / "s.jsonl", tmp_path / "s.summary.json"
    out.write_text("keep me\n")
    summary.write_text("{}")
    assert tool.main([str(byte_ckpt), "--out", str(out), "--overwrite", "--length", "40"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "longer than the model's training length 32" in err and "--extrapolate" in err
    assert out.read_text() == "keep me\n" and summary.read_text() == "{}"


def test_extrapolate_samples_past_the_training_length_with_a_warning(byte_ckpt, tmp_path):
    out = tmp_path / "s.jsonl"
    proc = cli(str(byte_ckpt), "--out", str(out), "--num-samples", "1", "--steps", "2", "--length", "40",
               "--extrapolate")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "past the model's training length 32 (--extrapolate)" in proc.stderr
    summary = json.loads((tmp_path / "s.summary.json").read_text())
    assert summary["extrapolated"] is True and summary["model_length"] == 32 and summary["length"] == 40
    assert len(read_jsonl(out)[0]["ids"]) == 40
