"""tools/evaluate.py with real processes: the same result for any DP size, TP/PP agree with one process,
training checkpoints evaluate in their layout, bad requests fail before any work."""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.dist import launch
from tests.test_convert import train
from tests.test_convert_formats import tiny_consolidated
from tests.test_evaluation import empty_splits
from tests.test_trainer import recipe_dict

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _tool():
    module = importlib.import_module("sedd_scale.cli.evaluate")
    return module


def evaluate(argv: list[str]) -> dict | None:
    """tools/evaluate.py's run() on this rank (the process group already exists)."""
    from sedd_scale.distributed import parallel

    tool = _tool()
    try:
        return tool.run(tool.parser().parse_args(argv))
    finally:
        parallel.destroy_parallel()


def manifest(tmp: Path) -> str:
    """valid and test splits of 13 and 11 sequences of the tiny model's 11 tokens (length 8)."""
    from sedd_scale.data.manifest import TokenizerInfo
    from sedd_scale.data.prepare import write_sequences

    rng = np.random.default_rng(0)
    splits = {s: rng.integers(0, 10, (n, 8)).astype(np.int64) for s, n in (("train", 4), ("valid", 13), ("test", 11))}
    write_sequences(tmp / "data", splits, TokenizerInfo("synthetic", 11, 10), seqs_per_sample=2, seqs_per_shard=4)
    return str(tmp / "data" / "manifest.json")


def test_any_dp_size_gives_the_same_result_and_layouts_agree(tmp_path):
    data = manifest(tmp_path)
    ckpt = str(tiny_consolidated(tmp_path / "c"))
    common = [ckpt, "--manifest", data, "--draws", "4", "--seed", "3", "--batch-size", "2"]
    one = launch(evaluate, 1, common + ["--out", str(tmp_path / "one.json"), "--tensorboard", str(tmp_path / "tb")])[0]
    dp2 = launch(evaluate, 2, common)[0]
    dp3 = launch(evaluate, 3, common)[0]
    tp2 = launch(evaluate, 2, common + ["--tp", "2"])[0]
    pp2 = launch(evaluate, 2, common + ["--pp", "2"])[0]
    assert one["split"] == "test" and one["sequences"] == 11 and one["tokens"] == 88  # padding rows count nothing
    for other in (dp2, dp3):
        assert [other[k] for k in ("nats_per_token", "stderr", "data_stderr", "batches")] == \
            [one[k] for k in ("nats_per_token", "stderr", "data_stderr", "batches")]
    for other in (tp2, pp2):  # other reduction orders inside the model only
        assert math.isclose(other["nats_per_token"], one["nats_per_token"], rel_tol=1e-5)
    assert json.loads((tmp_path / "one.json").read_text())["nats_per_token"] == one["nats_per_token"]
    logged = [json.loads(line) for line in (tmp_path / "tb" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["eval/test/elbo_nats_per_token"] == one["nats_per_token"]
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())
    assert 0 < one["stderr"] < one["nats_per_token"] and one["perplexity_bound"] == math.exp(one["nats_per_token"])
    assert one["batches"] == 6 and one["replicates"] == 2 and 0 < one["data_stderr"] < one["nats_per_token"]
    assert logged[-1]["eval/test/elbo_data_stderr"] == one["data_stderr"]
    other_seed = launch(evaluate, 1, [ckpt, "--manifest", data, "--draws", "4", "--seed", "4", "--batch-size", "2"])[0]
    assert other_seed["nats_per_token"] != one["nats_per_token"]
    # The bound holds for random weights too: at least the entropy of the data's uniform 10 tokens is paid.
    assert one["nats_per_token"] > math.log(10) - 4 * one["stderr"]


def test_training_checkpoint_evaluates_in_its_layout(tmp_path):
    from sedd_scale.apps import convert

    data = manifest(tmp_path)
    recipe = recipe_dict(str(tmp_path / "run"), pp=2, zero_stage=1)
    launch(train, 2, recipe, 2)
    args = ["--manifest", data, "--split", "valid", "--draws", "4", "--seed", "1"]
    piped = launch(evaluate, 2, [str(tmp_path / "run")] + args)[0]
    convert.consolidate(tmp_path / "run", tmp_path / "ema", weights="ema")
    single = launch(evaluate, 1, [str(tmp_path / "ema"), "--pp", "1", "--batch-size", "2"] + args)[0]
    assert piped["step"] == 2 and piped["sequences"] == 13
    assert math.isclose(piped["nats_per_token"], single["nats_per_token"], rel_tol=1e-5)
    with pytest.raises(RuntimeError, match="launch 2 ranks"):
        launch(evaluate, 1, [str(tmp_path / "run")] + args)


def test_bad_requests_exit_2_before_any_work(tmp_path):
    ckpt = str(tiny_consolidated(tmp_path / "c"))
    data = manifest(tmp_path)
    (tmp_path / "not-a-checkpoint").mkdir()
    (tmp_path / "not-a-checkpoint" / "notes.txt").write_text("no checkpoint here")
    cases = {"does not exist": [str(tmp_path / "nope")],
             f"{tmp_path / 'not-a-checkpoint'} is neither a checkpoint folder": [str(tmp_path / "not-a-checkpoint")],
             "--draws must be >= 2": [ckpt, "--draws", "1"],
             "needs the model's tokenizer": [ckpt, "--protocol", "ptb"],  # the same as --datasets ptb
             "seq_len": [ckpt, "--manifest", str(_other_length(tmp_path))],
             "exists": [ckpt, "--manifest", data, "--out", data],
             "holds no sequences in its split 'test'": [ckpt, "--manifest", empty_splits(tmp_path),
                                                        "--out", str(tmp_path / "new.json")]}
    for message, argv in cases.items():
        run = subprocess.run([sys.executable, str(ROOT / "tools" / "evaluate.py"), *argv], capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 2 and message in run.stderr, (message, run.stderr[-2000:])
        assert "Traceback" not in run.stderr and run.stderr.count("error: ") == 1, run.stderr  # one line
    assert not (tmp_path / "new.json").exists()



def _other_length(tmp: Path) -> Path:
    from sedd_scale.data.manifest import TokenizerInfo
    from sedd_scale.data.prepare import write_sequences

    splits = {s: np.zeros((4, 16), dtype=np.int64) for s in ("train", "valid")}
    write_sequences(tmp / "len16", splits, TokenizerInfo("synthetic", 11, 10), seqs_per_sample=2, seqs_per_shard=4)
    return tmp / "len16" / "manifest.json"


def random_model(path: Path, num_tokens: int, length: int) -> Path:
    """A consolidated model with small random weights (so its bound is finite and not trivial)."""
    from sedd_scale.checkpoint import consolidated as cons
    from sedd_scale.model.config import ModelConfig

    cfg = ModelConfig(hidden_size=32, n_heads=4, n_blocks=1, cond_dim=16, num_tokens=num_tokens, length=length,
                      vocab_multiple=1, dropout=0.0)
    gen = torch.Generator().manual_seed(0)
    weights = {k: 0.05 * torch.randn(s, generator=gen) for k, s in cons.expected_shapes(cfg).items()}
    return cons.write(path, cfg, {"type": "loglinear", "eps": 1e-3}, weights, which="raw", provenance={})


def test_ptb_zero_shot_protocol_blocks_the_test_split(tmp_path):
    """--datasets ptb: the detokenized PTB test lines, GPT-2 tokens + EOS each, cut into model-length blocks."""
    from sedd_scale.data.corpora import load_corpus
    from sedd_scale.data.manifest import Manifest
    from sedd_scale.data.tokenizer import get_tokenizer

    path = random_model(tmp_path / "gpt2-vocab", 50257, 64)
    result = launch(evaluate, 1, [str(path), "--datasets", "ptb", "--max-batches", "2", "--batch-size", "2",
                                  "--draws", "2"])[0]["datasets"]["ptb"]
    assert result["split"] == "test" and result["tokens"] == 2 * 2 * 64 and math.isfinite(result["nats_per_token"])
    manifest = Manifest.load(result["manifest"])
    tok = get_tokenizer("gpt2")
    total = sum(len(tok.encode(line)) + 1 for line in load_corpus("ptb")["test"])  # + EOS per line
    assert manifest.seq_len == 64 and manifest.splits["test"].num_sequences == total // 64  # remainder dropped
    assert result["dropped_tokens"] == total % 64


def test_two_zero_shot_sets_from_their_files_in_one_run(tmp_path, capsys):
    """A byte-vocabulary model over LAMBADA and WikiText-103 fixture files: one JSON and one table with both sets,
    each set's numbers those of the plain evaluator on its prepared blocks (same seed and draws)."""
    from tests.test_eval_sets import EXPECTED, FIX

    ckpt = str(random_model(tmp_path / "byte", 257, 16))
    common = ["--draws", "4", "--seed", "5", "--batch-size", "2"]
    tool = _tool()
    out = tmp_path / "sets.json"
    argv = [ckpt, "--datasets", "lambada,wikitext103", "--lambada-file", str(FIX / "lambada_test.jsonl"),
            "--wikitext103-file", str(FIX / "wiki.test.raw"), "--out", str(out), *common]
    result = launch(evaluate, 1, argv)[0]
    assert list(result["datasets"]) == ["lambada", "wikitext103"] and json.loads(out.read_text()) == result
    for name, r in result["datasets"].items():
        stream = sum(len(doc.encode("utf-8")) + 1 for doc in EXPECTED[name][1])  # bytes + EOS per document
        assert r["sequences"] == stream // 16 and r["tokens"] == 16 * r["sequences"]
        assert r["dropped_tokens"] == stream % 16 and r["batches"] == -(-r["sequences"] // 2)
        assert 0 < r["stderr"] < r["nats_per_token"] and 0 < r["data_stderr"] < r["nats_per_token"]
        assert r["perplexity_bound"] == math.exp(r["nats_per_token"])
        plain = launch(evaluate, 1, [ckpt, "--manifest", r["manifest"], "--split", "test", *common])[0]
        assert [plain[k] for k in ("nats_per_token", "stderr", "data_stderr")] == \
            [r[k] for k in ("nats_per_token", "stderr", "data_stderr")]
    short = tmp_path / "short.jsonl"
    short.write_text('{"text": "too short"}\n')
    with pytest.raises(RuntimeError, match="fewer tokens than one block of the model's length 16 in lambada"):
        launch(evaluate, 1, [ckpt, "--datasets", "lambada", "--data-file", str(short), *common])
    table = tool.format_table(result).splitlines()
    assert table[-3].split()[:2] == ["dataset", "nats_per_token"]
    assert [line.split()[0] for line in table[-2:]] == ["lambada", "wikitext103"]
    assert float(table[-1].split()[1]) == round(result["datasets"]["wikitext103"]["nats_per_token"], 4)
