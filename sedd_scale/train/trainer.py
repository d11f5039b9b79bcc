"""The training loop: DeepSpeed (ZeRO, pipeline) around megatron-core TP layers, exact resume.

One optimizer step = `grad_accum` micro-batches per data-parallel rank. Each micro-batch is
noised by `noising.noise_batch` (a function of seed, step, micro-batch and global row), the loss
is the fused vocab-parallel score entropy, and DeepSpeed reduces, clips and steps. Everything a
resumed run needs to continue bit-identically is in the checkpoint: model and optimizer shards
(DeepSpeed), LR schedule, EMA shard, data-loader state, RNG states, counters.

Checkpoints (`checkpoint/saver.py`): DeepSpeed's save is snapshotted to host memory
(`checkpoint/files.py::SnapshotIO`) and written in the background while training goes on; the
small all-reduce every step makes anyway (the pre-emption flag) also says when every rank has
finished, and rank 0 then commits. The pre-emption and final checkpoints are written at once.
No checkpoint is written while updates are being skipped for non-finite values; when such a
streak stops the run, `latest` is moved back to a checkpoint from before it.
"""
from __future__ import annotations

import contextlib
import math
import random
import resource
import secrets
import shutil
import signal
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import sedd_scale.compat  # noqa: F401  (before megatron / deepspeed)

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel

from sedd_scale.checkpoint.files import SnapshotIO, to_host
from sedd_scale.checkpoint.saver import Saver
from sedd_scale.checkpoint.sharded import ANY_LAYOUT, CheckpointDir, CheckpointError, check_layout, read_meta, step_of
from sedd_scale.config import Layout, Recipe, to_dict
from sedd_scale.data.prompts import split_prompts
from sedd_scale.diffusion import ElboEstimate, get_graph
from sedd_scale.diffusion.evaluation import evaluate
from sedd_scale.diffusion.graph import check_token_ids
from sedd_scale.diffusion.samplers import Sampled, parse_sampler
from sedd_scale.diffusion.sampling import unigram_entropy
from sedd_scale.distributed import deepspeed_files as ds_files
from sedd_scale.distributed import engine as ds_engine
from sedd_scale.distributed import parallel
from sedd_scale.distributed.pipeline import head_loss_config
from sedd_scale.distributed.runner import build_runner
from sedd_scale.model import ModelConfig
from sedd_scale.plan.flops import projected_fraction, training_flops_per_token
from sedd_scale.train.ema import EMA
from sedd_scale.train.metrics import IntervalStats, Metrics, MetricsError, NoiseBandLoss
from sedd_scale.train.noising import NoisedBatch, noise_batch


@dataclass
class TrainResult:
    """What a run did: per-step mean loss per token (global batch), skipped steps, last validation (and the step
    it was measured at)."""

    start_step: int
    losses: list[float] = field(default_factory=list)
    skipped_steps: int = 0
    valid: ElboEstimate | None = None
    valid_step: int | None = None
    stopped_by_signal: bool = False


class _StopFlag:
    """SIGTERM / SIGUSR1 (slurm pre-emption) ask for a checkpoint and a clean exit at the next step."""

    def __init__(self):
        self.raised: str | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.raised = signal.Signals(signum).name


def _device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _rng_state() -> dict:
    state = {"device": _device_type(), "torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": np.random.get_state(), "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict, reseed) -> str | None:
    """Restore the RNG states; those of another device type (megatron's tracker and the CUDA generator hold
    device generator states) are reseeded by `reseed()` instead. Returns a note saying so, or None."""
    here, saved = _device_type(), state.get("device", "cpu")
    note = None
    if saved == here:
        tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
        if "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"])
    else:
        reseed()  # before the CPU state below: megatron's seeding also seeds the default generator
        note = (f"the checkpoint's RNG states were written on {saved} and this run is on {here}: the CPU, Python "
                "and NumPy generators are restored; megatron's tensor-parallel RNG tracker"
                f"{' and the CUDA generator' if here == 'cuda' else ''} are reseeded from (seed, step), so dropout "
                "masks differ from an uninterrupted run's")
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    return note


def _shared_run_id() -> str:
    """A random id drawn by rank 0 and shared with every rank (names this trainer's staging folders)."""
    token = [secrets.token_hex(4) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(token, src=0)
    return token[0]


class Trainer:
    """Builds the engine, data and monitoring for a recipe on an initialised layout, then trains."""

    def __init__(self, recipe: Recipe, layout: Layout, topology, *, loader, checkpoint_dir: str | Path | None = None):
        """`loader`: this rank's micro-batches of clean tokens, iterable with state_dict/load_state_dict;
        `checkpoint_dir`: where checkpoints go (default recipe.checkpoint.dir)."""
        self.recipe, self.layout = recipe, layout
        self.device = parallel.local_device()
        self.rank = dist.get_rank()
        self.dp_rank = ps.get_data_parallel_rank()
        self.model_cfg: ModelConfig = recipe.model
        self.graph = get_graph(self.model_cfg.graph, num_tokens=self.model_cfg.num_tokens)
        self.noise = recipe.diffusion.schedule()
        parallel.seed_parallel(recipe.train.seed)
        loss_cfg = head_loss_config(self.model_cfg, recipe.diffusion.objective)
        # A micro-batch of the training shape on which pipeline stages compile their regions before the first
        # transfer (all at once, not one after the other along the first step's schedule). Made from a private
        # generator: no RNG stream or data position moves.
        warm_up = None
        # Prompt/response rows (`loader.conditional`): prompts are held clean and unscored, and the logged losses
        # are per response token.
        self.conditional = bool(getattr(loader, "conditional", False))
        if self.model_cfg.compile:
            tokens = torch.randint(0, self.model_cfg.num_tokens, (layout.micro_batch, recipe.data.seq_len),
                                   generator=torch.Generator().manual_seed(0))
            given = torch.zeros_like(tokens, dtype=torch.bool) if self.conditional else None
            nb = self._noised(tokens, step=0, micro=0, given=given)
            warm_up = (nb.x0, nb.x_t, nb.total_noise, nb.rate)
        self.runner = build_runner(self.model_cfg, recipe, layout, topology, loss_cfg, self.device, warm_up)
        self.engine = self.runner.engine
        self.io = self.engine.checkpoint_engine = SnapshotIO()
        # Sharded over DeepSpeed's data group, DP x CP: a ZeRO-3 parameter's own partition is its EMA shard.
        self.ema = EMA(self._local_params(), recipe.train.ema,
                       dp_rank=ps.get_data_parallel_rank(with_context_parallel=True), dp_size=layout.data_group_size,
                       group=ps.get_data_parallel_group(with_context_parallel=True))
        self.loader = loader
        self.batches = iter(loader)
        self.checkpoints = CheckpointDir(checkpoint_dir or recipe.checkpoint.dir, keep_last=recipe.train.keep_last)
        self.saver = Saver(self.checkpoints, rank=self.rank, world_size=layout.world_size, run_id=_shared_run_id(),
                           device=self.device)
        self.step = 0
        self.tokens_seen = 0
        self.stop = _StopFlag()  # installed now: a pre-emption signal during setup is honoured too
        self.data_wait = 0.0  # seconds spent waiting for the loader in the current step
        self._responses = 0  # response positions of this rank's micro-batches in the current step (conditional)
        self.notes: list[str] = []  # what a resume changed or could not restore, for the logs
        self._staging: Path | None = None  # the folder of the last save started (gone once committed)

    # -- state ---------------------------------------------------------------------------------
    def _local_params(self) -> list[torch.Tensor]:
        """This rank's parameters (TP/PP shards; ZeRO-3 ones carry their DP partition in .ds_tensor)."""
        return list(self.engine.module.parameters())

    def save(self, *, sync: bool = False) -> float:
        """Checkpoint the current step: snapshot to host memory, then write in the background (periodic saves
        with train.async_save) or at once (`sync`). Returns the seconds training was held up."""
        started = time.perf_counter()
        self.saver.wait()  # the previous save is committed before this one starts
        staging = self._staging = self.saver.staging(self.step)
        self.engine.save_checkpoint(str(staging), tag=ds_files.FOLDER, save_latest=False)
        files = self.io.take()
        extra = {"step": self.step, "tokens_seen": self.tokens_seen, "ema": self.ema.state_dict(),
                 "rng": _rng_state(), "loader": self.loader.state_dict(),
                 "skipped_total": self.base_optimizer().skipped_total,
                 # DeepSpeed's names of this rank's parameters, in the EMA's order (read by checkpoint/offline.py)
                 "param_names": [name for name, _ in self.engine.module.named_parameters()]}
        files.append((staging / f"rank_{self.rank:05d}.pt", to_host(extra)))
        meta = {"layout": self.layout.as_dict(), "tokens_seen": self.tokens_seen, "recipe": to_dict(self.recipe),
                "world_size": self.layout.world_size}
        background = self.recipe.train.async_save and not sync
        self.saver.start(self.step, files, meta, background=background)
        if not background:
            self.saver.wait()
        return time.perf_counter() - started

    def resume(self) -> bool:
        """Load the latest checkpoint when there is one (and the recipe allows it)."""
        latest = self.checkpoints.latest() if self.recipe.checkpoint.resume else None
        if latest is None:
            return False
        self.load(latest)
        return True

    def load(self, path: Path) -> None:
        """Restore everything from the checkpoint folder `path` (written under this layout), verifying every file
        read against the sizes and sha256 recorded when it was written; then apply the current recipe's
        optimizer settings (`recipe_changes.APPLIED`)."""
        path = Path(path)
        meta = read_meta(path)
        if meta["layout"] == ANY_LAYOUT:
            self._load_layout_free(path, meta)
            return
        check_layout(meta, self.layout.as_dict())
        earlier = [p.name for p in self.checkpoints.steps() if step_of(p) < meta["step"]]
        fix = (f"resume from an earlier checkpoint instead (write one of {earlier[-3:]} into "
               f"{self.checkpoints.root / 'latest'}), or restore the file from a copy" if earlier else
               "restore the file from a copy; this run has no earlier checkpoint")
        self.io.expect(path, meta["files"], fix)
        error, extra = None, None
        try:  # every file read is verified; reading involves no collective, so ranks can agree afterwards
            self.engine.load_checkpoint(str(path), tag=ds_files.FOLDER, load_optimizer_states=True,
                                        load_lr_scheduler_states=True)
            extra = self.io.load(str(path / f"rank_{self.rank:05d}.pt"))
        except CheckpointError as e:
            error = e
        failed = torch.tensor([float(error is not None)], device=self.device)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if error is not None:
            raise error
        if bool(failed):
            raise CheckpointError(f"another rank could not read its files of {path} (its error names the file): {fix}")
        self.step, self.tokens_seen = extra["step"], extra["tokens_seen"]
        self.ema.load_state_dict(extra["ema"])
        seed = self.recipe.train.seed + 1_000_003 * self.step
        note = _set_rng_state(extra["rng"], reseed=lambda: parallel.seed_parallel(seed))
        if note:
            self.notes.append(note)
        self.loader.load_state_dict(extra["loader"])
        self.batches = iter(self.loader)
        self.base_optimizer().skipped_total = extra["skipped_total"]
        self._apply_recipe_settings()

    def _load_layout_free(self, path: Path, meta: dict) -> None:
        """A step written by the conversion tools: rank 0 checks every file once, then each rank reads its slices of
        the whole tensors (`full_state.load`); the first save writes this run's own layout."""
        from sedd_scale.checkpoint import consolidated as cons
        from sedd_scale.checkpoint import full_state
        from sedd_scale.checksums import file_record, once

        fix = "convert the checkpoint again (tools/convert_checkpoint.py reshard), or restore it from a copy"

        def check() -> None:
            for rel, record in meta["files"].items():
                if not (path / rel).is_file():
                    raise CheckpointError(f"{path / rel} is missing: {fix}")
                if file_record(path / rel) != record:
                    raise CheckpointError(f"{path / rel} is damaged (not the bytes meta.json recorded): {fix}")

        once(check, (CheckpointError,))  # rank 0 hashes, every rank raises its verdict
        ckpt = cons.open_consolidated(path / "state", verify=False)  # verified above, once
        if ckpt.has_training_state:
            full_state.load(self, ckpt.training_tensors(), ckpt.counters())
        else:  # weights only: training starts from them
            full_state.load(self, {"weights": ckpt.weights()}, None)
        self.batches = iter(self.loader)
        self._apply_recipe_settings()

    def _apply_recipe_settings(self) -> None:
        """The current recipe's optimizer hyperparameters, LR schedule and EMA decay over what a checkpoint restored
        (DeepSpeed restores the saved param groups and the schedule's base learning rates)."""
        o = self.recipe.optim
        groups = self.base_optimizer().param_groups
        for group in groups:
            group.update(betas=o.betas, eps=o.eps, weight_decay=o.weight_decay if group["decay"] else 0.0)
        scheduler = self.engine.lr_scheduler
        scheduler.base_lrs = [o.lr] * len(groups)
        lr = o.lr_at(scheduler.last_epoch, self.recipe.train.steps)
        for group in groups:
            group["lr"] = lr
        scheduler._last_lr = [lr] * len(groups)
        self.ema.decay = self.recipe.train.ema

    def base_optimizer(self):
        """The torch optimizer inside DeepSpeed's wrappers (it holds the AdamW state and the skip counters)."""
        opt = self.engine.optimizer
        while not hasattr(opt, "skipped_in_a_row"):  # DeepSpeed's ZeRO/bf16 wrappers hold ours as .optimizer
            opt = opt.optimizer
        return opt

    # -- steps ---------------------------------------------------------------------------------
    def _noised(self, x0: torch.Tensor, step: int, micro: int, given: torch.Tensor | None = None) -> NoisedBatch:
        lay, d = self.layout, self.recipe.diffusion
        return noise_batch(x0.to(self.device), self.graph, self.noise, seed=self.recipe.train.seed, step=step,
                           row_offset=lay.row_offset(micro, self.dp_rank),
                           global_rows=lay.global_batch, sampling_eps=d.sampling_eps, stratified=d.stratified,
                           given=None if given is None else given.to(self.device))

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(tokens, prompt mask or None) of the next micro-batch."""
        started = time.perf_counter()
        batch, given = next(self.batches), None
        self.data_wait += time.perf_counter() - started
        if self.conditional:
            batch, given = split_prompts(batch, self.recipe.data.seq_len)
        # Where data enters: on the host, before the copy to the device (the fused loss does not check again).
        check_token_ids(batch, "a training batch from the loader", self.model_cfg.num_tokens, self.model_cfg.graph,
                        self.model_cfg.num_tokens)
        return batch, given

    def _micro_batches(self, step: int) -> Iterator:
        for micro in range(self.layout.grad_accum):
            tokens, given = self._next_batch()
            if given is not None:
                self._responses += int((~given).sum())
            nb = self._noised(tokens, step, micro, given)
            yield nb.x0, nb.x_t, nb.total_noise, nb.rate

    def _per_token(self, loss: float) -> float:
        """The step's mean loss per sequence as a loss per token: per response token for conditional rows (their
        count over the global batch: a small all-reduce over DP, then a max over the pipeline, whose middle stages
        read no data)."""
        if not self.conditional:
            return loss / self.recipe.data.seq_len
        responses = torch.tensor([float(self._responses)], dtype=torch.float64, device=self.device)
        self._responses = 0
        dist.all_reduce(responses, group=ps.get_data_parallel_group())
        if self.layout.pp > 1:
            dist.all_reduce(responses, op=dist.ReduceOp.MAX, group=ps.get_pipeline_model_parallel_group())
        return loss * self.layout.global_batch / float(responses)

    def train_step(self, bands: NoiseBandLoss | None = None) -> float:
        """One optimizer step; returns the global mean loss per token (per response token for conditional rows).
        `bands` collects the per-sequence losses by noise level (on the device) when the update is applied."""
        self.engine.train()
        loss = self.runner.train_batch(self._micro_batches(self.step))
        # Skipped by our optimizer (ZeRO-0) or by DeepSpeed's ZeRO/bf16 wrapper: the engine knows either way.
        self.base_optimizer().record(self.engine.was_step_applied())
        kept = self.runner.records.take()  # (total noise, per-sequence loss) per micro-batch; none off the last stage
        if not self.base_optimizer().last_skipped:
            self.ema.update(self._local_params())
            # TP and context-parallel ranks hold the same (whole-sequence) losses: one of them counts
            if bands is not None and ps.get_tensor_model_parallel_rank() == 0 and ps.get_context_parallel_rank() == 0:
                for total_noise, per_sequence, scored in kept:
                    bands.add(total_noise, per_sequence, scored)
        self.step += 1
        self.tokens_seen += self.layout.global_batch * self.recipe.data.seq_len
        return self._per_token(float(loss))

    # -- evaluation and samples ----------------------------------------------------------------
    @torch.no_grad()
    def eval_loss(self, x0: torch.Tensor, x_t: torch.Tensor, total_noise: torch.Tensor, rate: torch.Tensor) -> float:
        """Mean over the micro-batch of rate * sum_i score entropy through this layout (the same value on every
        rank)."""
        return self.runner.eval_loss(x0, x_t, total_noise, rate)

    @torch.no_grad()
    def validate(self, batches: Iterable, draws: int, *, antithetic: bool = True, seed: int | None = None,
                 ema: bool = True, progress=None) -> ElboEstimate:
        """The ELBO over `batches` (.tokens, .valid, .index and, for conditional data, .given: `EvalLoader`'s) with
        EMA (or raw) weights; with prompts, the bound on the responses given them, per response token.

        `sedd_scale.diffusion.evaluation.evaluate` through the training engine, so TP/PP layouts never gather
        the vocabulary; DP ranks evaluate their own batches and the result is independent of DP.
        """
        self.engine.eval()
        seed = self.recipe.train.seed + 7919 if seed is None else seed
        with self.ema.applied(self._local_params()) if ema else contextlib.nullcontext():
            return evaluate(self.eval_loss, self.graph, self.noise, batches, draws=draws, antithetic=antithetic,
                            seed=seed, device=self.device, dp_group=ps.get_data_parallel_group(), progress=progress)

    def samples(self, count: int, steps: int) -> torch.Tensor:
        """A few unconditional samples with EMA weights (the recipe's train.sampler), the same on every rank."""
        return self.sampled(count, steps).tokens

    @torch.no_grad()
    def sampled(self, count: int, steps: int) -> Sampled:
        """`samples` with the network evaluations they took (NFE per sequence)."""
        gen = torch.Generator(device=self.device).manual_seed(self.recipe.train.seed + self.step)
        with self.ema.applied(self._local_params()):
            return parse_sampler(self.recipe.train.sampler)(
                self.runner.log_scores, self.graph, self.noise, (count, self.recipe.data.seq_len), steps=steps,
                device=self.device, generator=gen)

    # -- the loop ------------------------------------------------------------------------------
    def fit(self, *, valid_batches: list | None = None, decode=None, metrics: Metrics | None = None,
            max_steps: int | None = None) -> TrainResult:
        """Train to recipe.train.steps (or `max_steps` more steps); save periodically, on signals and at the end.

        A pre-emption signal (SIGTERM, SIGUSR1) ends the step with a checkpoint and nothing else: validation and
        samples still to come are skipped. A failed metrics write stops every rank with MetricsError."""
        try:
            return self._fit(valid_batches, decode, metrics, max_steps)
        except BaseException:
            self._discard_uncommitted()
            raise

    def _fit(self, valid_batches: list | None, decode, metrics: Metrics | None, max_steps: int | None) -> TrainResult:
        """The training loop of `fit`."""
        tc = self.recipe.train
        end = tc.steps if max_steps is None else min(tc.steps, self.step + max_steps)
        result = TrainResult(start_step=self.step)
        seq_len, world = self.recipe.data.seq_len, self.layout.world_size
        flops = training_flops_per_token(self.model_cfg, seq_len, projected_fraction(self.recipe))
        bands = NoiseBandLoss(self.noise.total_noise, device=self.device) if metrics else None
        interval = IntervalStats()  # what the next log line averages over
        streak_start = None  # the first step of a run of skipped (non-finite) updates
        stall = 0.0  # seconds the last save held training up
        while self.step < end:
            started, self.data_wait = time.perf_counter(), 0.0
            loss = self.train_step(bands)
            elapsed = time.perf_counter() - started
            opt = self.base_optimizer()
            result.losses.append(loss)
            interval.add(None if opt.last_skipped else loss, elapsed, self.data_wait)
            if opt.last_skipped:
                result.skipped_steps += 1
                streak_start = streak_start or self.step
                if metrics:
                    metrics.message(f"step {self.step}: non-finite loss or gradient, update skipped "
                                    f"({opt.skipped_in_a_row} in a row; no checkpoint is written until an update "
                                    "succeeds)")
                if opt.skipped_in_a_row >= tc.max_nonfinite_steps:
                    self._diverged(streak_start, opt.skipped_in_a_row)
            else:
                streak_start = None
            if metrics:
                metrics.advance()
            if metrics and (self.step % tc.log_every == 0 or self.step == end):
                tokens_per_s = interval.steps * self.layout.global_batch * seq_len / interval.seconds
                step_time = interval.seconds / interval.steps
                scalars = {"train/loss_per_token": interval.mean_loss(), "train/lr": self.engine.get_lr()[0],
                           "train/tokens_per_s": tokens_per_s, "train/tokens_per_s_per_device": tokens_per_s / world,
                           "train/tokens_seen": self.tokens_seen, "train/step_time_s": step_time,
                           "train/samples_per_s": tokens_per_s / seq_len,
                           "train/model_tflops_per_s": flops * tokens_per_s / 1e12 / world,
                           "train/skipped_steps": opt.skipped_total, "train/checkpoint_stall_s": stall,
                           "train/data_wait_fraction": interval.data_wait / interval.seconds,
                           **bands.take(seq_len)}
                norm = self.engine.get_global_grad_norm()
                if norm is not None:
                    scalars["train/grad_norm"] = float(norm)
                if tc.peak_tflops:
                    scalars["train/mfu"] = scalars["train/model_tflops_per_s"] / tc.peak_tflops
                if torch.cuda.is_available():
                    scalars["train/max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
                else:  # the process's peak resident memory (Linux reports KiB)
                    scalars["train/max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
                metrics.scalars(self.step, scalars)
                interval = IntervalStats()
            # After a pre-emption signal the scheduler's grace period is for the checkpoint: no validation or samples
            # (tens of seconds on a real model) run after it, on any rank (`signalled` is a collective).
            if valid_batches and (self.step % tc.eval_every == 0 or self.step == end) and not self.signalled():
                result.valid, result.valid_step = self.validate(valid_batches, draws=tc.eval_draws), self.step
                if metrics:
                    valid = {"valid/elbo_nats_per_token": result.valid.nats_per_token,
                             "valid/elbo_stderr": result.valid.stderr,  # Monte-Carlo, from independent replicates
                             "valid/perplexity_bound": result.valid.perplexity_bound}
                    if math.isfinite(result.valid.data_stderr):  # over the validation batches (needs two)
                        valid["valid/elbo_data_stderr"] = result.valid.data_stderr
                    metrics.scalars(self.step, valid)
                    v = result.valid
                    conditional = any(getattr(b, "given", None) is not None for b in valid_batches)
                    per = "response token" if conditional else "token"
                    metrics.message(f"step {self.step}: validation ELBO {v.nats_per_token:.4f} +- {v.stderr:.4f} "
                                    f"nats/{per}, perplexity <= {v.perplexity_bound:.2f} ({v.num_sequences} "
                                    f"sequences, {v.num_tokens} {per}s, EMA weights)")
                if metrics and not self.signalled():
                    drawn = self.sampled(2, steps=tc.sample_steps)
                    texts = drawn.tokens
                    metrics.scalars(self.step, {"samples/unigram_entropy": float(unigram_entropy(texts.cpu()).mean()),
                                                "samples/nfe": drawn.nfe})
                    if decode is not None:
                        metrics.text(self.step, "samples", "\n\n---\n\n".join(decode(t.tolist()) for t in texts))
            stop, writing, failed, metrics_failed = self._status(metrics)
            if self.saver.pending is not None and not writing:
                self.saver.finish(failed)  # every rank is done: rank 0 commits (or all raise)
            if metrics_failed:
                self._stop_for_metrics(metrics)
            skipping = streak_start is not None
            if stop:
                self._stop_for_signal(skipping, metrics)
                result.stopped_by_signal = True
                return result
            if not skipping and (self.step % tc.save_every == 0 or self.step == end):
                stall = self.save(sync=self.step == end)
        self.saver.wait()
        self.saver.close()
        if metrics:  # the last events are written now: a failure is every rank's, like one during the loop
            metrics.flush()
            if self._status(metrics)[3]:
                self._stop_for_metrics(metrics)
        return result

    def signalled(self) -> bool:
        """Whether a pre-emption signal reached any rank (a collective: every rank calls it at the same point)."""
        flag = torch.tensor([float(self.stop.raised is not None)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag)

    def _status(self, metrics: Metrics | None = None) -> tuple[bool, bool, bool, bool]:
        """(a pre-emption signal reached some rank, some rank is still writing a checkpoint, some rank's write
        failed, some rank's metrics write failed): one small all-reduce per step."""
        metrics_failed = metrics is not None and metrics.failure is not None
        flags = torch.tensor([float(self.stop.raised is not None), *self.saver.status(), float(metrics_failed)],
                             device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        stop, writing, failed, metrics_failed = (bool(v) for v in flags.tolist())
        return stop, writing, failed, metrics_failed

    def _stop_for_metrics(self, metrics: Metrics | None) -> None:
        """A metrics write failed (a full disk, the file-size limit): every rank finishes the checkpoint being
        written (committed, or removed when a rank could not write it) and raises MetricsError with rank 0's
        message and the checkpoint the run resumes from."""
        failures: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(failures, metrics.take_failure() if metrics else None)
        failure = next(f for f in failures if f is not None)
        also = ""
        try:
            self.saver.wait()
        except (CheckpointError, OSError) as e:  # on a full disk the checkpoint in flight fails too: said, not lost
            also = f"; the checkpoint being written failed as well: {e}"
        self.saver.close()
        latest = self.checkpoints.latest()
        resume = f"it resumes from {latest}" if latest else "it starts from scratch (no checkpoint was committed)"
        raise MetricsError(f"{failure}, then start the run again: training stopped at step {self.step}; {resume}, "
                           f"committed checkpoints are untouched{also}")

    def _discard_uncommitted(self) -> None:
        """After an error in the loop: wait for this rank's checkpoint writer, then rank 0 removes the staging
        folder of a save that was not committed, so a failed run (e.g. on a full disk) leaves no half checkpoint
        behind. Committed checkpoints are untouched. (A rank still writing when rank 0 failed alone may leave
        files there again; the next run's start removes such leftovers.)"""
        pending = self.saver.pending
        if pending is not None and pending.thread is not None:
            pending.thread.join()
        if self.rank == 0 and self._staging is not None and self._staging.exists():
            try:
                shutil.rmtree(self._staging)
            except OSError as e:  # the error being raised matters more; say what is left, and where
                print(f"warning: could not remove the uncommitted checkpoint folder {self._staging} ({e}): delete "
                      "it, or the next run's start removes it", file=sys.stderr, flush=True)

    def _stop_for_signal(self, skipping: bool, metrics: Metrics | None) -> None:
        """Pre-emption: write this step's checkpoint at once (nothing else), and say what was written how fast."""
        signame = self.stop.raised or "a signal on another rank"
        if skipping:
            self.saver.wait()
            line = (f"{signame} at step {self.step} during a run of skipped updates: no checkpoint written, "
                    f"{self.checkpoints.latest()} stays latest")
        else:
            seconds = self.save(sync=True)
            last = self.saver.last
            line = (f"{signame} at step {self.step}: checkpoint {last['path']} written in {seconds:.1f} s "
                    f"({last['bytes'] / 2**30:.2f} GiB from this rank); exiting")
        self.saver.close()
        if self.rank == 0:
            (metrics.message if metrics else print)(line)

    def _diverged(self, streak_start: int, skipped: int) -> None:
        """Stop after too many skipped updates, pointing `latest` at a checkpoint from before the streak.

        The checkpoint of the step just before the first skipped one holds the update that produced the
        non-finite values (e.g. a learning rate far too large), so the newest trusted one is older still.
        """
        self.saver.wait()
        self.saver.close()
        name = [None]
        if self.rank == 0:
            good = self.checkpoints.roll_back(streak_start - 2)
            name = [None if good is None else str(good)]
        dist.broadcast_object_list(name, src=0)
        where = (f"{self.checkpoints.root / 'latest'} now names {name[0]}, the newest checkpoint from before the "
                 "streak (newer ones were renamed diverged-step_*)" if name[0] else
                 f"no checkpoint older than step {streak_start - 1} is left in {self.checkpoints.root} "
                 f"(latest is unchanged: {self.checkpoints.latest()}, which may hold the diverging update)")
        raise FloatingPointError(
            f"{skipped} consecutive steps had non-finite losses or gradients (steps {streak_start}-{self.step}); "
            f"stopping. {where}. Lower optim.lr (a resume applies it) or check the data, then resume.")


def setup_and_build(recipe: Recipe, **kwargs) -> Trainer:
    """Process groups for the launched world, then a Trainer (used by `python -m sedd_scale.train`)."""
    layout, topology = ds_engine.setup(recipe)
    return Trainer(recipe, layout, topology, **kwargs)

