"""The Python API: a model directory loaded once; `generate` gives what tools/sample.py gives for the same request, and
`score`'s ELBO per text is batch-independent with an honest Monte-Carlo error, from any working directory."""
from __future__ import annotations

import json
import statistics

import pytest
import torch

from sedd_scale.apps.api import load_model
from sedd_scale.apps.generation import GenerationError
from tests.test_sample_tool import BLANK_LEN, LENGTH, TEMPLATE, byte_ckpt, cli  # noqa: F401  (byte_ckpt: a fixture)


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the tool runs with one thread: the same matmuls
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model(byte_ckpt):  # noqa: F811
    """The model, and its process group destroyed after the module (load_model keeps it for the caller)."""
    import torch.distributed as dist

    from sedd_scale.distributed import parallel

    yield load_model(byte_ckpt, device="cpu")
    parallel.destroy_parallel()
    dist.destroy_process_group()


def test_generate_matches_the_sample_tool(model, byte_ckpt, tmp_path, one_thread):  # noqa: F811
    kwargs = dict(steps=12, template=TEMPLATE, blank_len=BLANK_LEN, length=LENGTH, seed=7, batch_size=2)
    texts = model.generate(4, **kwargs)
    assert len(texts) == 4 and all(t.startswith("The") and " sat on" in t for t in texts)
    done = cli(str(byte_ckpt), "--num-samples", "4", "--batch-size", "2", "--steps", "12", "--template", TEMPLATE,
               "--blank-len", str(BLANK_LEN), "--length", str(LENGTH), "--seed", "7", "--out",
               str(tmp_path / "s.jsonl"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    tool = [json.loads(line)["text"] for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert texts == tool
    assert model.generate(4, **kwargs) == texts  # the seed decides
    assert model.generate(4, **{**kwargs, "seed": 8}) != texts


def test_generate_with_a_prefix_and_a_fast_sampler(model, one_thread):
    texts = model.generate(3, steps=8, prefix="Hi ", length=16, sampler="confidence:threshold=0.5", seed=1)
    assert len(texts) == 3 and all(t.startswith("Hi ") for t in texts)
    with pytest.raises(ValueError, match="sampler"):
        model.generate(1, steps=4, sampler="nope")


def test_score_is_batch_independent_with_an_honest_error(model, one_thread):
    texts = ["the cat", "a dog sat on the mat", "the cat"]
    scores = model.score(texts, draws=8, seed=3, batch_size=3)
    alone = [model.score([t], draws=8, seed=3)[0] for t in texts[:2]]
    assert scores[0].nats == pytest.approx(alone[0].nats, rel=1e-6) and scores[1].tokens == len(texts[1])
    assert scores[0].nats != scores[2].nats  # text i draws from (seed, i): equal texts, independent estimates
    # The reported error is the spread another seed gives: 12 seeds, the sample SD within a factor of 2 of it.
    runs = [model.score(texts[:1], draws=8, seed=s)[0] for s in range(12)]
    spread = statistics.stdev(r.nats for r in runs)
    reported = statistics.mean(r.stderr for r in runs)
    assert 0.5 < spread / reported < 2.0, (spread, reported)
    assert all(s.nats > 0 and s.perplexity_bound > 1 for s in scores)
    with pytest.raises(GenerationError, match="1 to 32 tokens"):
        model.score(["x" * 40])


def test_loads_from_any_directory(byte_ckpt, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    assert len(load_model(byte_ckpt.resolve(), device="cpu").generate(1, steps=2, length=8)) == 1
