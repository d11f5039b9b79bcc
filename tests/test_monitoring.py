"""Monitoring: the Weights & Biases sink (offline, read back from its run files), the run's settings in tensorboard,
what rank 0 prints at start and at each validation, the silenced third-party noise, the conversion progress bars."""
from __future__ import annotations

import importlib.util
import json
import logging
import re
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest

from sedd_scale.config import RecipeError
from sedd_scale.config.recipe import WandbConfig
from sedd_scale.train.quiet import DEEPSPEED_LINES, silence_known_noise
from tests.test_run_safety import records, tiny_recipe, train_main, write_recipe

HAVE_WANDB = importlib.util.find_spec("wandb") is not None
needs_wandb = pytest.mark.skipif(not HAVE_WANDB, reason="the [wandb] extra is not installed (it is in [test])")


def wandb_records(run_dir: Path) -> list[tuple[str, object]]:
    """(kind, record) of every record of the offline W&B runs under `run_dir`, oldest run first.

    A `.wandb` file is W&B's transaction log: a 7-byte header, then LevelDB-log blocks of 32 KiB whose chunks (4-byte
    checksum, 2-byte length, 1-byte type: 1 full, 2 first, 3 middle, 4 last) carry protobuf `Record`s."""
    from wandb.proto import wandb_internal_pb2 as pb

    out = []
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        raw, pos, chunk = path.read_bytes(), 7, b""
        assert raw[:4] == b":W&B", path
        while pos + 7 <= len(raw):
            left = 32768 - pos % 32768
            if left < 7:  # a block's tail too short for a header is padding
                pos += left
                continue
            _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
            if kind == 0:  # zero padding to the block's end
                pos += left
                continue
            chunk += raw[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):
                record = pb.Record.FromString(chunk)
                out.append((record.WhichOneof("record_type"), record))
                chunk = b""
    return out


def wandb_history(run_dir: Path) -> dict[int, dict]:
    """{step: {key: value}} of what the W&B runs under `run_dir` logged (wandb's own `_` keys left out)."""
    history: dict[int, dict] = {}
    for kind, record in wandb_records(run_dir):
        if kind == "history":
            # a nested value (an HTML file's fields) comes as its path of keys
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history.setdefault(record.history.step.num, {}).update(
                {k: v for k, v in row.items() if not k.startswith("_")})
    return history


def wandb_config(run_dir: Path) -> dict:
    """The run config the W&B runs under `run_dir` recorded (the later update wins)."""
    config = {}
    for kind, record in wandb_records(run_dir):
        items = record.run.config.update if kind == "run" else record.config.update if kind == "config" else []
        config.update({item.key: json.loads(item.value_json) for item in items if item.key != "_wandb"})
    return config


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """W&B offline, writing nothing outside tmp_path, uploading nothing."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_SILENT", "true")


@needs_wandb
def test_wandb_sink_logs_finite_scalars_texts_and_config_and_a_resume_continues_the_run(offline, tmp_path):
    import wandb

    from sedd_scale.train.wandb_sink import RUN_ID_FILE, WandbSink

    run = tmp_path / "run"
    cfg = WandbConfig(project="sedd-test", mode="offline")
    sink = WandbSink(cfg, run, config={"optim.lr": 0.01, "layout.dp": 2}, start_step=0)
    sink.scalars(1, {"train/loss_per_token": 2.5, "train/grad_norm": float("nan")})
    sink.scalars(2, {"train/loss_per_token": 2.25})
    sink.text(2, "samples", "a <b>")
    sink.close()
    first = sink.id
    assert (run / RUN_ID_FILE).read_text().strip() == first and not sink.resumed

    sink = WandbSink(cfg, run, config={"optim.lr": 0.005, "layout.dp": 2}, start_step=2)  # a resume at step 2
    assert sink.id == first and sink.resumed and "(resumed)" in sink.description
    sink.scalars(3, {"train/loss_per_token": 2.0, "valid/elbo_nats_per_token": 1.5})
    sink.close()
    wandb.teardown()  # the last run's file is complete once wandb's service stops (as at a process's exit)

    history = wandb_history(run)
    assert sorted(history) == [1, 2, 3]
    assert history[1] == {"train/loss_per_token": 2.5}  # the NaN is left out, as tensorboard leaves it out
    assert history[2]["train/loss_per_token"] == 2.25 and history[2]["samples/_type"] == "html-file"
    html = next(run.glob(f"wandb/offline-run-*/files/{history[2]['samples/path']}"))
    assert "<pre>a &lt;b&gt;</pre>" in html.read_text()
    assert history[3] == {"train/loss_per_token": 2.0, "valid/elbo_nats_per_token": 1.5}
    assert wandb_config(run) == {"optim.lr": 0.005, "layout.dp": 2}  # the resume's applied change
    assert {p.name.rsplit("-", 1)[-1] for p in run.glob("wandb/offline-run-*")} == {first}


def test_a_run_starting_at_step_0_draws_a_new_wandb_run_id(tmp_path):
    """A start-over under the old id would log nothing until it passed the old run's last step."""
    from sedd_scale.train.wandb_sink import run_id

    first, resumed = run_id(tmp_path, resuming=False)
    assert not resumed and run_id(tmp_path, resuming=True) == (first, True)
    second, resumed = run_id(tmp_path, resuming=False)
    assert second != first and not resumed and run_id(tmp_path, resuming=True) == (second, True)


def test_wandb_without_the_package_is_one_error_at_the_recipe_check(monkeypatch, tmp_path, capsys):
    from sedd_scale.train import main as train
    from sedd_scale.train import run_dir
    from sedd_scale.train.wandb_sink import check_available

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    check_available(WandbConfig())  # off: nothing needed
    check_available(WandbConfig(project="p", mode="disabled"))
    with pytest.raises(RecipeError, match=re.escape("pip install 'sedd-scale[wandb]'")):
        check_available(WandbConfig(project="p"))
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path / "data", tmp_path / "run",
                                                           train={"wandb": {"project": "p"}}))
    for entry in (train.main, run_dir.main):  # the trainer and the launcher's pre-flight
        assert entry([recipe]) == 2
        err = capsys.readouterr().err
        assert err.count("error:") == 1 and "train.wandb.project = 'p'" in err and "sedd-scale[wandb]" in err, err


def test_known_third_party_noise_is_silenced_and_anything_else_shown():
    with warnings.catch_warnings(record=True) as caught:  # restores the filters afterwards
        warnings.simplefilter("always")
        silence_known_noise()
        for module in ("megatron.core.optimizer", "megatron.core.optimizer.clip_grads", "sedd_scale.model"):
            warnings.warn_explicit("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.",
                                   UserWarning, "x.py", 1, module=module)
        warnings.warn_explicit("`torch.distributed.all_gather_into_tensor` is deprecated. Please use "
                               "`torch.distributed.all_gather_single` instead.", FutureWarning, "c10d_logger.py", 83,
                               module="torch.distributed.c10d_logger")
        warnings.warn_explicit("something new went wrong", UserWarning, "x.py", 1, module="megatron.core.optimizer")
    shown = [str(w.message)[:28] for w in caught]
    # Only the unknown warning, and the known message from a module it is not known from, get through.
    assert shown == ["Transformer Engine and Apex ", "something new went wrong"], shown

    logger = logging.getLogger("DeepSpeed")
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        silence_known_noise()  # twice: one filter
        logger.warning("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.")
        logger.warning("**** You are using ZeRO with an untested optimizer, proceed with caution *****")
        logger.warning("Gradient overflow in the fp16 optimizer")
    finally:
        logger.removeHandler(handler)
    assert seen == ["Gradient overflow in the fp16 optimizer"]
    assert len([f for f in logger.filters if type(f).__name__ == "_KnownLines"]) == 1


def test_the_silenced_lines_are_still_what_deepspeed_says():
    """A silenced line that DeepSpeed no longer writes is a stale entry: its pattern must match DeepSpeed's source."""
    spec = importlib.util.find_spec("deepspeed")
    root = Path(spec.origin).parent
    sources = {p: (root / p).read_text() for p in ("accelerator/real_accelerator.py", "runtime/engine.py")}
    for pattern, why in DEEPSPEED_LINES:
        assert why and any(re.search(pattern, text) for text in sources.values()), pattern


@pytest.mark.megatron
def test_parameter_counts_take_tensor_parallel_shards_whole_and_replicated_tensors_once(tp1):
    """A TP rank other than 0 contributes only the tensors megatron splits (`tensor_model_parallel`); its copies of
    replicated ones (norms, adaLN) are rank 0's. Checked on one rank posing as each TP rank."""
    import torch

    from sedd_scale.train.run_summary import parameter_counts, start_lines

    split, replicated = torch.nn.Parameter(torch.zeros(6, 5)), torch.nn.Parameter(torch.zeros(7))
    split.tensor_model_parallel = True
    first = parameter_counts([split, replicated], tp_rank=0, pp_rank=0, dp_rank=0)
    other = parameter_counts([split, replicated], tp_rank=1, pp_rank=0, dp_rank=0)
    assert (first.total, first.per_stage, first.per_rank) == (37, [37], 37)
    assert (other.total, other.per_stage, other.per_rank) == (30, [30], 37)
    assert parameter_counts([split], tp_rank=0, pp_rank=0, dp_rank=1).per_stage == [0]  # DP replicas: not counted

    from sedd_scale.config import Recipe, from_dict

    recipe = from_dict(Recipe, tiny_recipe(Path("d"), Path("r"), parallel={"global_batch": 8}))
    lines = start_lines(recipe, recipe.layout(1), first)
    assert lines[1] == "parameters: 37" and lines[2].startswith("tokens per optimizer step: 64 (global batch 8"), lines


def test_progress_bars_only_where_watched_or_asked(monkeypatch, capsys):
    from sedd_scale.checkpoint import progress

    monkeypatch.delenv("SEDD_PROGRESS", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert not progress.wanted()  # pytest's stderr is no terminal: CI logs get no bars
    monkeypatch.setenv("SEDD_PROGRESS", "1")
    assert progress.wanted()
    with progress.bar(2048, "reading step_000000001") as shown:
        shown.update(2048)
    err = capsys.readouterr().err
    assert "reading step_000000001" in err and "100%" in err and "2.00k" in err, err
    monkeypatch.setenv("RANK", "1")  # one bar per job, not one per rank
    assert not progress.wanted()


@needs_wandb
@pytest.mark.slow
@pytest.mark.megatron
def test_a_training_run_reports_its_settings_and_validation_and_logs_the_same_scalars_to_wandb(data, tmp_path,
                                                                                                offline, monkeypatch,
                                                                                                capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    from sedd_scale.config import Recipe, from_dict

    run = tmp_path / "run"
    raw = tiny_recipe(data, run, train={"steps": 3, "eval_every": 3, "wandb": {"project": "sedd-test"}})
    recipe = write_recipe(tmp_path / "r.yaml", raw)
    code, out = train_main(recipe)
    assert code == 0, out
    # The parameter count against the model's hand count (an independent formula), the tokens per step.
    params = from_dict(Recipe, raw).model.num_params(1)
    assert f"parameters: {params / 1e3:.3g}k ({params:,})" in out, out
    assert "tokens per optimizer step: 32 (global batch 4 x seq_len 8" in out, out
    # Third-party noise known to be harmless is gone (megatron's warnings reach this output; DeepSpeed's logger
    # writes to the process's own stdout, checked by the filter test).
    assert "Transformer Engine and Apex are not installed" not in out, out

    jsonl = records(run)
    valid = next(r for r in jsonl if "valid/elbo_nats_per_token" in r)
    line = re.search(r"step 3: validation ELBO (\S+) \+- (\S+) nats/token", out)
    assert line and float(line[1]) == pytest.approx(valid["valid/elbo_nats_per_token"], abs=6e-5), out
    assert float(line[2]) == pytest.approx(valid["valid/elbo_stderr"], abs=6e-5)

    # W&B got the same scalars at the same steps (the finite ones), and the flattened recipe as its config.
    history = wandb_history(run)
    for record in jsonl:
        scalars = {k: v for k, v in record.items() if k not in ("step", "time", "event") and np.isfinite(v)}
        if scalars:
            assert {k: history[record["step"]][k] for k in scalars} == pytest.approx(scalars, rel=1e-12), record
    config = wandb_config(run)
    assert config["optim.lr"] == 0.01 and config["train.wandb.project"] == "sedd-test"
    assert config["layout.dp"] == 1 and config["parameters.total"] == params

    # Tensorboard: the recipe and layout as texts, the flattened recipe as hyperparameters.
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    texts = {tag: events.Tensors(tag)[0].tensor_proto.string_val[0].decode() for tag in events.Tags()["tensors"]}
    assert "lr: 0.01" in texts["run/recipe/text_summary"] and "parameters:" in texts["run/layout/text_summary"]
    start = plugin_data_pb2.HParamsPluginData.FromString(
        events.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info.hparams
    assert start["optim.lr"].number_value == 0.01 and start["model.graph"].string_value == "absorb"
    assert start["layout.grad_accum"].number_value == 2

    # Resharding the run's checkpoint shows its progress when asked: the files read, written and checksummed.
    from sedd_scale.apps import convert

    monkeypatch.setenv("SEDD_PROGRESS", "1")
    capsys.readouterr()
    convert.reshard(run, tmp_path / "resharded", tp=1, pp=1, dp=1)
    err = capsys.readouterr().err
    assert "reading step_000000003" in err and "checksumming resharded" in err and "100%" in err, err
    assert re.search(r"writing \S+: 100%", err), err
