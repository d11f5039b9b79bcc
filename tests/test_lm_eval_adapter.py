"""The lm-evaluation-harness adapter on a tiny byte-vocabulary model: loglikelihood against an independent
estimate of the conditional ELBO, loglikelihood_rolling against our evaluator on the same blocks, generation,
and lm-eval itself running local JSONL tasks (nothing downloaded)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")  # the `eval`/`test` extra; without it the adapter cannot exist

from lm_eval.api.instance import Instance  # noqa: E402

from sedd_scale.apps.lm_eval_adapter import SEDDLM, request_key, rolling_windows  # noqa: E402
from sedd_scale.diffusion.elbo import elbo_per_sequence, prior_kl  # noqa: E402
from sedd_scale.diffusion.evaluation import evaluate  # noqa: E402
from tests.test_evaluate_tool import random_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LENGTH = 24


@pytest.fixture(scope="module", autouse=True)
def own_process_group():
    """load_pretrained joins a one-process group in this process: left as found for the tests that follow."""
    import torch.distributed as dist

    from sedd_scale.distributed import parallel

    had = dist.is_initialized()
    yield
    if not had and dist.is_initialized():
        parallel.destroy_parallel()
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return random_model(tmp_path_factory.mktemp("sedd") / "byte", 257, LENGTH)


@pytest.fixture(scope="module")
def lm(model_dir) -> SEDDLM:
    return SEDDLM(pretrained=str(model_dir), mc_draws=4, seed=3, batch_size=3, device="cpu", steps=4)


def request(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_rolling_windows_by_hand():
    ids = list(range(10))
    assert rolling_windows(ids, 4) == ([[0, 1, 2, 3], [4, 5, 6, 7]], [6, 7, 8, 9], 2)
    assert rolling_windows(ids[:8], 4) == ([[0, 1, 2, 3], [4, 5, 6, 7]], None, 0)
    assert rolling_windows(ids[:3], 4) == ([], [0, 1, 2], 0) and rolling_windows([], 4) == ([], None, 0)


def independent_conditional_elbo(lm, ids, given, draws, seed):
    """-log p(free | given) bounded by plain Monte Carlo written from the definition (sedd-math 2-3): t ~ U(0, 1),
    x_t noised at the free positions only, sigma(t) * sum over free positions of score entropy, plus the leaky
    prior lam log N per free token; (mean, standard error)."""
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.tensor([ids])
    free = torch.arange(len(ids))[None] >= given
    values = []
    for _ in range(draws):
        t = torch.rand(1, dtype=torch.float64, generator=gen)
        total, rate = lm.noise.total_noise(t), lm.noise.rate_noise(t)
        x_t = torch.where(free, lm.graph.sample_transition(x0, total, generator=gen), x0)
        with torch.no_grad():
            se = lm.graph.score_entropy(lm.log_score(x_t, total)[..., : lm.graph.dim], total, x_t, x0)
        values.append(float(rate * (se.double() * free).sum()))
    values = torch.tensor(values, dtype=torch.float64)
    lam = math.exp(-float(lm.noise.total_noise(torch.ones((), dtype=torch.float64))))
    prior = lam * math.log(lm.num_tokens) * int(free.sum())
    return float(values.mean()) + prior, float(values.std() / math.sqrt(draws))


def test_loglikelihood_is_the_conditional_elbo(lm, model_dir, one_thread):
    context, continuation = "The cat sat on the ", "mat."
    (logprob, greedy), = lm.loglikelihood([request("loglikelihood", context, continuation)])
    ctx, cont = lm.tok.encode("The cat sat on the"), lm.tok.encode(" mat.")  # the context's space moves over
    ids, given = ctx + cont, len(ctx)
    # The plumbing: the library's conditional bound on these tokens with the request's own generator.
    gen = [lm.generator("loglikelihood", f"{context}\0{continuation}")]
    bound, var = elbo_per_sequence(lm.log_score, lm.graph, lm.noise, torch.tensor([ids]), num_samples=4,
                                   generator=gen, given=torch.arange(len(ids))[None] < given)
    assert logprob == -float(bound[0]) and lm.last_stderr == [math.sqrt(float(var[0]))] and isinstance(greedy, bool)
    # The value: an independent plain Monte-Carlo estimate of the same conditional bound agrees with a long run.
    many = SEDDLM(pretrained=str(model_dir), mc_draws=64, seed=11, device="cpu")
    (precise, _), = many.loglikelihood([request("loglikelihood", context, continuation)])
    mean, err = independent_conditional_elbo(lm, ids, given, 256, seed=5)
    combined = math.sqrt(err**2 + many.last_stderr[0] ** 2)
    assert abs(-precise - mean) < 4 * combined, (-precise, mean, combined)
    assert -precise > 0 and many.last_stderr[0] < 0.2 * mean
    # Same request, same number: in another batch, in another order, next to other requests.
    other = [request("loglikelihood", "A", " b"), request("loglikelihood", context, continuation),
             request("loglikelihood", "Some other text", " of this length")]
    assert lm.loglikelihood(other)[1][0] == logprob


def test_long_contexts_are_left_truncated_and_long_continuations_refused(lm):
    long_context = "x" * 100 + "The end of the context"
    kept = long_context[-(LENGTH - 3):]
    truncated, direct = lm.loglikelihood([request("loglikelihood", long_context, "!!!"),
                                          request("loglikelihood", kept, "!!!")])
    ids = lm.tok.encode(kept) + lm.tok.encode("!!!")
    assert len(ids) == LENGTH
    # The same tokens scored, each request with its own (text-keyed) noise: equal within the Monte-Carlo error.
    assert abs(truncated[0] - direct[0]) < 6 * math.hypot(*lm.last_stderr)
    with pytest.raises(ValueError, match=f"exceeds the model's length {LENGTH}"):
        lm.loglikelihood([request("loglikelihood", "a", "b" * (LENGTH + 1))])
    assert lm.loglikelihood([request("loglikelihood", "abc", "")]) == [(0.0, True)]


def test_loglikelihood_rolling_is_our_evaluator_on_the_blocks(lm, one_thread):
    """Two whole blocks through diffusion.evaluation.evaluate (the estimator of tools/evaluate.py) with the text's
    seed, plus the remainder as a conditional bound given the tokens before it."""
    text = "".join(chr(97 + (7 * i) % 26) for i in range(2 * LENGTH + 5))
    (total,) = lm.loglikelihood_rolling([request("loglikelihood_rolling", text)])
    ids = lm.tok.encode(text)
    blocks = torch.tensor([ids[:LENGTH], ids[LENGTH:2 * LENGTH]])

    class Batch:
        tokens, valid, index = blocks, torch.ones(2, dtype=torch.bool), request_key(text)

    def loss(x0, x_t, t, rate):
        se = lm.graph.score_entropy(lm.log_score(x_t, t)[..., : lm.graph.dim], t.double(), x_t, x0)
        return float((rate.double() * se.double().sum(-1)).mean())

    est = evaluate(loss, lm.graph, lm.noise, [Batch()], draws=4, seed=3)
    tail = torch.tensor([ids[-LENGTH:]])
    bound, _ = elbo_per_sequence(lm.log_score, lm.graph, lm.noise, tail, num_samples=4,
                                 generator=[lm.generator("rolling-remainder", text)],
                                 given=torch.arange(LENGTH)[None] < LENGTH - 5)
    assert total == pytest.approx(-(est.total_nats + float(bound[0])), rel=1e-12)
    # One block: the rolling bound and the loglikelihood of the text after an empty context estimate the same ELBO.
    block = text[:LENGTH]
    (alone,) = lm.loglikelihood_rolling([request("loglikelihood_rolling", block)])
    rolling_err = lm.last_stderr[0]
    (ll, _), = lm.loglikelihood([request("loglikelihood", "", block)])
    assert abs(alone - ll) < 5 * math.hypot(rolling_err, lm.last_stderr[0]), (alone, ll)
    assert -alone > float(prior_kl(lm.graph, lm.noise, tail)[0])


def test_generate_until_stops_at_until_and_is_reproducible(lm, one_thread):
    reqs = [request("generate_until", "Hello", {"until": ["e"], "max_gen_toks": 8}),
            request("generate_until", "Hi there", {"until": "zz", "max_gen_toks": 6})]
    first, again = lm.generate_until(reqs), lm.generate_until(reqs)
    assert first == again and "e" not in first[0] and len(first[1].encode("utf-8", "replace")) <= 6 * 3


def write_tasks(folder: Path, data: Path, cache: Path) -> None:
    """Three local lm-eval tasks over one JSONL file written by the test."""
    source = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n  cache_dir: {cache}\n"
              "test_split: test\n")
    (folder / "local_cloze.yaml").write_text(
        "task: local_cloze\n" + source + "output_type: loglikelihood\n"
        "doc_to_text: \"{{text.split(' ')[:-1]|join(' ')}}\"\ndoc_to_target: \"{{' '+text.split(' ')[-1]}}\"\n"
        "metric_list:\n  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    (folder / "local_ppl.yaml").write_text(
        "task: local_ppl\n" + source + "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\n"
        "doc_to_target: \"{{text}}\"\nmetric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
        "  - metric: bits_per_byte\n")


DOCS = ["the cat sat on the mat", "a dog ran in the park today", "birds fly south in the winter months"]


def test_lm_eval_runs_local_tasks_with_the_registered_model(model_dir, tmp_path, monkeypatch, one_thread):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    write_tasks(tmp_path, data, tmp_path / "hf-cache")
    args = f"pretrained={model_dir},mc_draws=4,seed=3,batch_size=2"
    out = simple_evaluate(model="sedd", model_args=args, tasks=["local_cloze", "local_ppl"], device="cpu",
                          task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
                          log_samples=True)
    ours = SEDDLM(pretrained=str(model_dir), mc_draws=4, seed=3, device="cpu")
    rolling = ours.loglikelihood_rolling([request("loglikelihood_rolling", d) for d in DOCS])
    words = sum(len(d.split()) for d in DOCS)
    assert out["results"]["local_ppl"]["word_perplexity,none"] == pytest.approx(math.exp(-sum(rolling) / words),
                                                                               rel=1e-9)
    cloze = ours.loglikelihood([request("loglikelihood", " ".join(d.split()[:-1]), " " + d.split()[-1])
                                for d in DOCS])
    logged = {s["doc"]["text"]: s["resps"][0][0] for s in out["samples"]["local_cloze"]}
    assert [tuple(logged[d]) for d in DOCS] == [(lp, g) for lp, g in cloze]
    assert out["results"]["local_cloze"]["perplexity,none"] == pytest.approx(
        math.exp(-sum(lp for lp, _ in cloze) / len(DOCS)), rel=1e-9)


@pytest.mark.slow
def test_the_documented_command_line_runs(model_dir, tmp_path):
    """`python -m sedd_scale.apps.lm_eval_adapter` is lm-eval's command line with `sedd` registered."""
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    write_tasks(tmp_path, data, tmp_path / "hf-cache")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "sedd_scale.apps.lm_eval_adapter", "--model", "sedd",
                          "--model_args", f"pretrained={model_dir},mc_draws=2", "--tasks", "local_ppl",
                          "--include_path", str(tmp_path), "--device", "cpu", "--batch_size", "2",
                          "--output_path", str(tmp_path / "res")],
                         capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in (tmp_path / "res").rglob("results*.json")]
    assert len(results) == 1 and math.isfinite(results[0]["results"]["local_ppl"]["word_perplexity,none"])
