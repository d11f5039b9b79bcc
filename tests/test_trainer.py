"""The trainer with real processes: every layout gives the losses of one process, resumes are exact."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from sedd_scale.data.loader import EvalBatch
from sedd_scale.testing.synthetic import SyntheticTokens
from tests.dist import launch

pytestmark = [pytest.mark.slow, pytest.mark.megatron]

STEPS = 3
LOSS_RTOL = 2e-5  # fp32, different reduction orders (TP all-reduces, DP averaging, ZeRO partitions)
VALID_RTOL = 1e-3  # the validation ELBO after the last update (see the test)


def recipe_dict(tmp: str, **parallel) -> dict:
    """A tiny model on synthetic tokens; dropout off so that layouts can match exactly."""
    return {
        "model": {"hidden_size": 32, "n_heads": 4, "n_blocks": 2, "cond_dim": 16, "num_tokens": 11, "length": 8,
                  "vocab_multiple": 1, "dropout": 0.0, "graph": "absorb", "scale_by_sigma": True},
        "data": {"manifests": ["unused.json"], "tokenizer": None, "seq_len": 8, "num_workers": 0},
        "optim": {"lr": 1e-2, "warmup": 1, "grad_clip": 0.5},
        # a hang (mismatched collectives) fails within 2 minutes, as under the test launcher's own group
        "parallel": {"micro_batch": 2, "global_batch": 8, "zero_stage": 0, "distributed_timeout_minutes": 2,
                     **parallel},
        "train": {"steps": 100, "ema": 0.9, "seed": 5, "save_every": 1000, "eval_every": 1000, "log_every": 1000,
                  "max_nonfinite_steps": 3},
        "checkpoint": {"dir": tmp},
    }


def _build(recipe_data: dict, conditional: bool = False):
    import sedd_scale.compat  # noqa: F401  (before megatron-core / DeepSpeed)

    from megatron.core import parallel_state as ps

    from sedd_scale.config import Recipe, from_dict
    from sedd_scale.distributed import engine  # first: it applies sedd_scale.compat before megatron loads
    from sedd_scale.train.trainer import Trainer

    recipe = from_dict(Recipe, copy.deepcopy(recipe_data))
    layout, topology = engine.setup(recipe)
    data = SyntheticTokens(recipe.model.num_tokens, recipe.data.seq_len, layout, ps.get_data_parallel_rank(),
                           prompts=conditional)
    return Trainer(recipe, layout, topology, loader=data)


def _run(recipe_data: dict, steps: int, resume_at: int | None = None, conditional: bool = False) -> list[float]:
    """Train `steps` steps (optionally: stop at `resume_at`, save, rebuild everything, resume); `conditional`:
    prompt/response rows (prompts held clean and unscored, in training and validation)."""
    from sedd_scale.distributed import parallel

    try:
        trainer = _build(recipe_data, conditional)
        if resume_at is None:
            losses = trainer.fit(max_steps=steps).losses
            # The validation ELBO through this layout's engine (EMA weights), on the rank's rows of a
            # fixed batch: TP and PP must reproduce one process (DP draws other t for other rows).
            rows = torch.randint(0, 11, (8, 8), generator=torch.Generator().manual_seed(99))
            dp, rank = trainer.layout.dp, trainer.dp_rank
            mine = slice(rank * 8 // dp, (rank + 1) * 8 // dp)
            given = None
            if conditional:
                prompt = torch.randint(0, 8, (8, 1), generator=torch.Generator().manual_seed(98))
                given = (torch.arange(8) < prompt)[mine]
            batch = EvalBatch(rows[mine], torch.ones(8 // dp, dtype=torch.bool), rank, given)
            valid = trainer.validate([batch], draws=2)
            samples = trainer.samples(3, steps=4)  # through this layout's model (pipeline stages too)
            assert samples.shape == (3, 8) and int(samples.min()) >= 0 and int(samples.max()) < 11
            return losses + [valid.nats_per_token] + [float(v) for v in samples.flatten()]
        losses = trainer.fit(max_steps=resume_at).losses  # ends with a (synchronous) checkpoint
        parallel.destroy_parallel()
        trainer = _build(recipe_data, conditional)  # a fresh model, optimizer, EMA and data source, as after a restart
        assert trainer.resume() and trainer.step == resume_at
        return losses + trainer.fit(max_steps=steps - resume_at).losses
    finally:
        parallel.destroy_parallel()  # the next layout in this process builds its own groups


def one_process(tmp: str) -> list[float]:
    return _run(recipe_dict(tmp + "/single"), STEPS)


def two_processes(tmp: str) -> dict:
    layouts = {"dp2-zero0": {}, "dp2-zero1": {"zero_stage": 1}, "dp2-zero2": {"zero_stage": 2},
               "dp2-zero3": {"zero_stage": 3}, "tp2": {"tp": 2}, "pp2": {"pp": 2, "zero_stage": 1},
               "tp2-sp-zero1": {"tp": 2, "sequence_parallel": True, "zero_stage": 1}}
    out = {name: _run(recipe_dict(f"{tmp}/{name}", **p), STEPS) for name, p in layouts.items()}
    for name, p in (("dp2-resume", {"zero_stage": 1}), ("pp2-resume", {"pp": 2, "zero_stage": 1})):
        out[name] = _run(recipe_dict(f"{tmp}/{name}", **p), 4, resume_at=2)
        out[name + "-ref"] = _run(recipe_dict(f"{tmp}/{name}-ref", **p), 4)
    return out


def four_processes(tmp: str) -> dict:
    # context parallelism beside TP and PP (CP alone, its resumes and reshards: tests/test_context_parallel.py);
    # sequence parallelism at TP4, and with PP2
    layouts = {"tp2-pp2": {"tp": 2, "pp": 2}, "tp2-cp2": {"tp": 2, "context_parallel": 2},
               "pp2-cp2": {"pp": 2, "context_parallel": 2}, "tp4-sp": {"tp": 4, "sequence_parallel": True},
               "tp2-sp-pp2": {"tp": 2, "pp": 2, "sequence_parallel": True}}
    return {name: _run(recipe_dict(f"{tmp}/{name}", zero_stage=1, **p), STEPS) for name, p in layouts.items()}


def test_layouts_match_one_process_and_resume_exactly(tmp_path):
    reference = launch(one_process, 1, str(tmp_path))[0]
    assert len(reference) == STEPS + 1 + 24 and all(math.isfinite(v) for v in reference)  # losses, valid, samples
    two = launch(two_processes, 2, str(tmp_path))
    four = launch(four_processes, 4, str(tmp_path))
    for results in (two, four):
        for name, losses in results[0].items():
            assert all(r[name] == losses for r in results), f"{name}: ranks disagree"
    measured = {name: losses for name, losses in {**two[0], **four[0]}.items() if "resume" not in name}
    for name, losses in measured.items():
        torch.testing.assert_close(torch.tensor(losses[:STEPS]), torch.tensor(reference[:STEPS]), rtol=LOSS_RTOL,
                                   atol=0, msg=lambda m, n=name: f"{n}: {m}")
        valid, ref_valid = losses[STEPS], reference[STEPS]
        assert math.isfinite(valid) and valid > 0
        if name in ("tp2", "pp2", "tp2-pp2", "tp2-cp2", "pp2-cp2") or "-sp" in name:
            # After the last Adam step: m / sqrt(v) turns last-bit differences of near-zero gradients
            # into lr-sized weight differences, so the weights (not the arithmetic) differ at ~1e-5.
            assert abs(valid - ref_valid) < VALID_RTOL * ref_valid, (name, valid, ref_valid)
    for name in ("dp2-resume", "pp2-resume"):
        resumed, uninterrupted = two[0][name], two[0][name + "-ref"][:4]  # (the reference also validates, samples)
        assert resumed == uninterrupted, f"{name}: resumed run differs from the uninterrupted one"
    worst = {k: max(abs(a - b) / abs(b) for a, b in zip(v[:STEPS], reference)) for k, v in measured.items()}
    print("single-process losses and validation", [round(x, 6) for x in reference[:STEPS + 1]],
          "max relative deviation per layout", worst)


def signals_nonfinite_and_layout_checks(tmp: str) -> dict:
    """One process: SIGUSR1 -> checkpoint and stop; NaN gradients -> skipped steps, then a clear stop
    with the last good checkpoint kept; a checkpoint of another layout is refused."""
    import os
    import signal

    from sedd_scale.checkpoint.sharded import CheckpointError
    from sedd_scale.distributed import parallel
    from sedd_scale.train.metrics import Metrics

    out = {}
    data = recipe_dict(tmp)
    data["train"].update(log_every=1, eval_every=1, eval_draws=2, sample_steps=2)  # validation due at every step
    trainer = _build(data)
    metrics = Metrics(f"{tmp}/tb", total_steps=100)
    rows = torch.randint(0, 11, (4, 8), generator=torch.Generator().manual_seed(3))
    os.kill(os.getpid(), signal.SIGUSR1)  # as slurm does before the time limit
    result = trainer.fit(max_steps=5, metrics=metrics, valid_batches=[EvalBatch(rows, torch.ones(4, dtype=bool), 0)])
    metrics.close()
    out["metrics"] = open(f"{tmp}/tb/metrics.jsonl").read()
    out["signal"] = (result.stopped_by_signal, trainer.step, trainer.checkpoints.latest().name, result.valid)
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    trainer.stop.raised = None  # the run would exit here; this test goes on with the same trainer

    with torch.no_grad():
        next(trainer.engine.module.parameters()).fill_(float("nan"))
    try:
        trainer.fit(max_steps=10)
        out["nonfinite"] = "no error"
    except FloatingPointError as e:
        out["nonfinite"] = str(e)
    out["skipped"] = trainer.base_optimizer().skipped_total
    out["latest_after_nan"] = trainer.checkpoints.latest().name
    parallel.destroy_parallel()

    other = recipe_dict(tmp)
    other["parallel"]["zero_stage"] = 1
    try:
        _build(other).resume()
        out["layout"] = "no error"
    except CheckpointError as e:
        out["layout"] = str(e)
    parallel.destroy_parallel()

    bf16 = recipe_dict(tmp + "/bf16")
    bf16["model"]["precision"] = "bf16"
    bf16["parallel"]["zero_stage"] = 1
    trainer = _build(bf16)
    out["bf16"] = (trainer.fit(max_steps=2).losses, next(trainer.engine.module.parameters()).dtype)
    parallel.destroy_parallel()
    return out


def test_signal_save_nonfinite_stop_layout_refusal_metrics_and_bf16(tmp_path):
    out = launch(signals_nonfinite_and_layout_checks, 1, str(tmp_path))[0]
    assert out["signal"] == (True, 1, "step_000000001", None), out  # straight to the checkpoint: no validation
    logged = [k for line in out["metrics"].splitlines() for k in json.loads(line)]
    assert not [k for k in logged if k.startswith(("valid/", "samples/"))], logged
    # The only checkpoint is the step right before the streak, which may hold the diverging update: it is not
    # trusted, so nothing older is left and `latest` stays (test_run_safety covers the roll-back).
    assert "3 consecutive steps had non-finite losses or gradients (steps 2-4)" in out["nonfinite"], out
    assert "no checkpoint older than step 1 is left" in out["nonfinite"], out
    assert out["skipped"] == 3 and out["latest_after_nan"] == "step_000000001", out
    assert "zero_stage: saved 0 vs now 1" in out["layout"] and "convert_checkpoint" in out["layout"], out
    record = json.loads(out["metrics"].splitlines()[0])
    for key in ("train/loss_per_token", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/samples_per_s",
                "train/model_tflops_per_s", "train/data_wait_fraction", "train/max_rss_gib",
                "train/tokens_per_s_per_device", "train/tokens_seen", "train/step_time_s"):
        assert key in record and math.isfinite(record[key]), (key, record)
    assert record["train/tokens_seen"] == 8 * 8  # one step of the global batch
    bands = {k: v for k, v in record.items() if k.startswith("train/loss_per_token_t")}
    # 8 sequences over 5 bands (a sequence of 8 tokens at small t may have nothing masked: a loss of 0)
    assert bands and all(math.isfinite(v) and v >= 0 for v in bands.values()) and max(bands.values()) > 0, record
    losses, dtype = out["bf16"]
    assert dtype == torch.bfloat16 and len(losses) == 2 and all(math.isfinite(v) for v in losses), out["bf16"]


def logged_interval(tmp: str) -> dict:
    from sedd_scale.distributed import parallel
    from sedd_scale.train.metrics import Metrics

    data = recipe_dict(tmp)
    data["train"].update(log_every=3, eval_every=3, eval_draws=2, sample_steps=2, sampler="confidence:threshold=0.9")
    try:
        trainer = _build(data)
        rows = torch.randint(0, 11, (4, 8), generator=torch.Generator().manual_seed(3))
        metrics = Metrics(f"{tmp}/tb", total_steps=100)
        valid = [EvalBatch(rows, torch.ones(4, dtype=bool), 0)]
        result = trainer.fit(max_steps=6, metrics=metrics, valid_batches=valid)
        metrics.close()
        trainer.saver.close()
        return {"losses": result.losses, "records": [json.loads(line) for line in open(f"{tmp}/tb/metrics.jsonl")]}
    finally:
        parallel.destroy_parallel()


def test_logged_loss_is_the_interval_mean_and_samples_report_their_entropy(tmp_path):
    """train/loss_per_token at a log step is the mean over the steps since the last one (not the last step's value);
    the periodic samples' unigram entropy and NFE (from train.sampler) are logged beside the validation ELBO."""
    out = launch(logged_interval, 1, str(tmp_path))[0]
    losses, records = out["losses"], out["records"]
    train = [r for r in records if "train/loss_per_token" in r]
    assert [r["step"] for r in train] == [3, 6]
    for r, chunk in zip(train, (losses[:3], losses[3:])):
        assert r["train/loss_per_token"] == pytest.approx(sum(chunk) / 3, rel=1e-12)
        assert r["train/loss_per_token"] != pytest.approx(chunk[-1], rel=1e-6)  # the steps differ
        assert r["train/tokens_seen"] == r["step"] * 8 * 8
    entropy = [r["samples/unigram_entropy"] for r in records if "samples/unigram_entropy" in r]
    assert len(entropy) == 2 and all(0 < h <= math.log(11) + 1e-9 for h in entropy), records
    nfe = [r["samples/nfe"] for r in records if "samples/nfe" in r]  # the recipe's train.sampler: NFE <= steps
    assert len(nfe) == 2 and all(1 <= v <= 2 for v in nfe), records
    assert sum("valid/elbo_nats_per_token" in r for r in records) == 2, records


def uniform(recipe_data: dict) -> dict:
    """The same run under the uniform graph (geometric noise)."""
    recipe_data["model"].update(graph="uniform", scale_by_sigma=False)
    recipe_data["diffusion"] = {"noise": "geometric"}
    return recipe_data

