"""The training loop: DeepSpeed (ZeRO, pipeline) around megatron-core TP layers, exact resume.

One optimizer step = `grad_accum` micro-batches per data-parallel rank. Each micro-batch is
noised by `noising.noise_batch` (a function of seed, step, micro-batch and global row), the loss
is the fused vocab-parallel score entropy, and DeepSpeed reduces, clips and steps. Everything a
resumed run needs to continue bit-identically is in the checkpoint: model and optimizer shards
(DeepSpeed), LR schedule, EMA shard, data-loader state, RNG states, counters.
"""
from __future__ import annotations

import contextlib
import os
import random
import resource
import signal
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from sedd_scale import compat  # noqa: F401  (before megatron / deepspeed)
from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core import tensor_parallel  # noqa: E402

from sedd_scale import engine as ds_engine  # noqa: E402
from sedd_scale import parallel  # noqa: E402
from sedd_scale.checkpoint.sharded import CheckpointDir, CheckpointError, check_layout, read_meta  # noqa: E402
from sedd_scale.config import Layout, Recipe, to_dict  # noqa: E402
from sedd_scale.diffusion import ElboEstimate, get_graph, get_noise, sample  # noqa: E402
from sedd_scale.evaluation import evaluate  # noqa: E402
from sedd_scale.ema import EMA  # noqa: E402
from sedd_scale.metrics import Metrics, training_flops_per_token  # noqa: E402
from sedd_scale.model import SEDD, ModelConfig  # noqa: E402
from sedd_scale.noising import NoisedBatch, global_row_offset, noise_batch  # noqa: E402
from sedd_scale.pipeline import SEDDTrainModule, build_pipeline, head_loss_config  # noqa: E402


@dataclass
class TrainResult:
    """What a run did: per-step mean loss per token (global batch), skipped steps, last validation."""

    start_step: int
    losses: list[float] = field(default_factory=list)
    skipped_steps: int = 0
    valid: ElboEstimate | None = None
    stopped_by_signal: bool = False


class _StopFlag:
    """SIGTERM / SIGUSR1 (slurm pre-emption) ask for a checkpoint and a clean exit at the next step."""

    def __init__(self):
        self.raised = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.raised = True

    def any_rank(self, device) -> bool:
        flag = torch.tensor(float(self.raised), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Trainer:
    """Builds the engine, data and monitoring for a recipe on an initialised layout, then trains."""

    def __init__(self, recipe: Recipe, layout: Layout, topology, *, loader):
        """`loader`: this rank's micro-batches of clean tokens, iterable with state_dict/load_state_dict."""
        self.recipe, self.layout = recipe, layout
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self.rank = dist.get_rank()
        self.dp_rank = ps.get_data_parallel_rank()
        self.is_pipe = layout.pp > 1
        self.model_cfg: ModelConfig = recipe.model
        self.graph = get_graph(self.model_cfg.graph, num_tokens=self.model_cfg.num_tokens)
        self.noise = get_noise(recipe.diffusion.noise, **recipe.diffusion.noise_kwargs())
        parallel.seed_parallel(recipe.train.seed)
        loss_cfg = head_loss_config(self.model_cfg)
        if self.is_pipe:
            module = build_pipeline(self.model_cfg, topology, loss_cfg, self.device)
        else:
            module = SEDDTrainModule(SEDD(self.model_cfg, self.device), loss_cfg)
        self.engine = ds_engine.build_engine(module, recipe, layout)
        self.ema = EMA(self._local_params(), recipe.train.ema)
        self.loader = loader
        self.batches = iter(loader)
        self.checkpoints = CheckpointDir(recipe.checkpoint.dir, keep_last=recipe.train.keep_last)
        self.step = 0
        self.tokens_seen = 0
        self.stop = _StopFlag()  # installed now: a pre-emption signal during setup is honoured too
        self.data_wait = 0.0  # seconds spent waiting for the loader in the current step

    # -- state ---------------------------------------------------------------------------------
    def _local_params(self) -> list[torch.Tensor]:
        """This rank's parameter shards (ZeRO-3 partitions where parameters are partitioned)."""
        return [getattr(p, "ds_tensor", p) for p in self.engine.module.parameters()]

    def layout_dict(self) -> dict:
        """The layout a checkpoint must match to be resumed without resharding."""
        return {"tp": self.layout.tp, "pp": self.layout.pp, "dp": self.layout.dp, "zero_stage": self.layout.zero_stage}

    def save(self) -> Path:
        """Write an atomic checkpoint of everything needed to resume exactly."""
        def write(folder: Path) -> None:
            self.engine.save_checkpoint(str(folder), tag="deepspeed", save_latest=False)
            extra = {"step": self.step, "tokens_seen": self.tokens_seen, "ema": self.ema.state_dict(),
                     "rng": _rng_state(), "loader": self.loader.state_dict(),
                     "skipped_total": self.base_optimizer().skipped_total}
            tmp = folder / f".rank_{self.rank:05d}.pt.tmp"
            torch.save(extra, tmp)
            os.replace(tmp, folder / f"rank_{self.rank:05d}.pt")

        meta = {"layout": self.layout_dict(), "tokens_seen": self.tokens_seen, "recipe": to_dict(self.recipe),
                "world_size": self.layout.world_size}
        return self.checkpoints.save(self.step, write, meta, rank=self.rank, barrier=dist.barrier)

    def resume(self) -> bool:
        """Load the latest checkpoint when there is one (and the recipe allows it)."""
        latest = self.checkpoints.latest() if self.recipe.checkpoint.resume else None
        if latest is None:
            return False
        self.load(latest)
        return True

    def load(self, path: Path) -> None:
        """Restore everything from the checkpoint folder `path` (written under this layout)."""
        path = Path(path)
        check_layout(read_meta(path), self.layout_dict())
        missing = [str(path / f) for f in ("deepspeed", f"rank_{self.rank:05d}.pt") if not (path / f).exists()]
        if missing:
            raise CheckpointError(f"checkpoint {path} is incomplete: {missing} missing (copy the whole step folder)")
        self.engine.load_checkpoint(str(path), tag="deepspeed", load_optimizer_states=True,
                                    load_lr_scheduler_states=True)
        extra = torch.load(path / f"rank_{self.rank:05d}.pt", weights_only=False)
        self.step, self.tokens_seen = extra["step"], extra["tokens_seen"]
        self.ema.load_state_dict(extra["ema"])
        _set_rng_state(extra["rng"])
        self.loader.load_state_dict(extra["loader"])
        self.batches = iter(self.loader)
        self.base_optimizer().skipped_total = extra["skipped_total"]

    def base_optimizer(self):
        """The torch optimizer inside DeepSpeed's wrappers (it holds the AdamW state and the skip counters)."""
        opt = self.engine.optimizer
        while not hasattr(opt, "skipped_in_a_row"):  # DeepSpeed's ZeRO/bf16 wrappers hold ours as .optimizer
            opt = opt.optimizer
        return opt

    # -- steps ---------------------------------------------------------------------------------
    def _noised(self, x0: torch.Tensor, step: int, micro: int) -> NoisedBatch:
        lay, d = self.layout, self.recipe.diffusion
        return noise_batch(x0.to(self.device), self.graph, self.noise, seed=self.recipe.train.seed, step=step,
                           row_offset=global_row_offset(micro, self.dp_rank, lay.micro_batch, lay.dp),
                           global_rows=lay.global_batch, sampling_eps=d.sampling_eps, stratified=d.stratified)

    def _next_batch(self) -> torch.Tensor:
        started = time.perf_counter()
        batch = next(self.batches)
        self.data_wait += time.perf_counter() - started
        return batch

    def _pipe_micro_batches(self, step: int) -> Iterator:
        for micro in range(self.layout.grad_accum):
            nb = self._noised(self._next_batch(), step, micro)
            yield (nb.x_t, nb.total_noise), (nb.x0, nb.x_t, nb.total_noise, nb.rate)

    def train_step(self) -> float:
        """One optimizer step; returns the global mean loss per token."""
        self.engine.train()
        if self.is_pipe:
            loss = self.engine.train_batch(data_iter=self._pipe_micro_batches(self.step)).detach().float()
        else:
            losses = []
            for micro in range(self.layout.grad_accum):
                nb = self._noised(self._next_batch(), self.step, micro)
                loss = self.engine(nb.x0, nb.x_t, nb.total_noise, nb.rate)
                self.engine.backward(loss)
                self.engine.step()
                losses.append(loss.detach().float())
            loss = torch.stack(losses).mean()
            dist.all_reduce(loss, group=ps.get_data_parallel_group())
            loss = loss / self.layout.dp
        if not self.base_optimizer().last_skipped:
            self.ema.update(self._local_params())
        self.step += 1
        self.tokens_seen += self.layout.global_batch * self.recipe.data.seq_len
        return float(loss) / self.recipe.data.seq_len

    # -- evaluation and samples ----------------------------------------------------------------
    @torch.no_grad()
    def eval_loss(self, x0: torch.Tensor, x_t: torch.Tensor, total_noise: torch.Tensor, rate: torch.Tensor) -> float:
        """Mean over the micro-batch of rate * sum_i score entropy through this layout (the same value on every rank)."""
        if not self.is_pipe:
            return float(self.engine.module(x0, x_t, total_noise, rate))
        # Stages cache the shapes they exchange; evaluation batches may differ from training's.
        self.engine.reset_activation_shape()
        batch = iter([((x_t, total_noise), (x0, x_t, total_noise, rate))])
        # No reduction: the engine would average over DP ranks, which evaluate different batches.
        out = self.engine.eval_batch(batch, num_micro_batches=1, reduce_output=None, bcast_loss=False)
        self.engine.reset_activation_shape()
        value = torch.zeros(1, dtype=torch.float64, device=self.device)
        if self.engine.is_last_stage():
            value[0] = float(out[0])
        group = ps.get_pipeline_model_parallel_group()
        dist.broadcast(value, src=dist.get_process_group_ranks(group)[-1], group=group)
        return float(value)

    @torch.no_grad()
    def validate(self, batches: Iterable, draws: int, *, antithetic: bool = True, seed: int | None = None,
                 ema: bool = True, progress=None) -> ElboEstimate:
        """The ELBO over `batches` (.tokens, .valid, .index: `EvalLoader`'s) with EMA (or raw) weights.

        `sedd_scale.evaluation.evaluate` through the training engine, so TP/PP layouts never gather
        the vocabulary; DP ranks evaluate their own batches and the result is independent of DP.
        """
        self.engine.eval()
        seed = self.recipe.train.seed + 7919 if seed is None else seed
        with self.ema.applied(self._local_params()) if ema else contextlib.nullcontext():
            return evaluate(self.eval_loss, self.graph, self.noise, batches, draws=draws, antithetic=antithetic,
                            seed=seed, device=self.device, dp_group=ps.get_data_parallel_group(), progress=progress)

    @torch.no_grad()
    def _pipe_log_scores(self, x: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary log-scores through the pipeline, made on the last stage and sent to every stage."""
        total = total.float()
        self.engine.reset_activation_shape()
        # The engine also evaluates the loss (its running total breaks without one); the labels are
        # placeholders of the right kinds and the value is discarded.
        batch = iter([((x, total), (torch.zeros_like(x), x, total, torch.ones_like(total)))])
        _, features = self.engine.eval_batch(batch, return_logits=True, bcast_loss=False, num_micro_batches=1)
        self.engine.reset_activation_shape()
        group = ps.get_pipeline_model_parallel_group()
        stage = self.engine.module.loss_fn.output_stage
        if stage is not None:  # the last stage
            out = parallel.gather_tp(stage.log_score(stage.linear(features)[0], x, total))
        else:
            out = torch.empty(*x.shape, self.model_cfg.padded_vocab(self.layout.tp), device=self.device)
        dist.broadcast(out, src=dist.get_process_group_ranks(group)[-1], group=group)
        return out

    @torch.no_grad()
    def samples(self, count: int, steps: int) -> torch.Tensor:
        """A few unconditional samples with EMA weights (analytic sampler), the same on every rank."""
        if self.is_pipe:
            log_score = self._pipe_log_scores
        else:
            model: SEDD = self.engine.module.model
            model.eval()

            def log_score(x, total):
                return parallel.gather_tp(model(x, total.float()))

        gen = torch.Generator(device=self.device).manual_seed(self.recipe.train.seed + self.step)
        with self.ema.applied(self._local_params()):
            return sample(log_score, self.graph, self.noise, (count, self.recipe.data.seq_len), steps=steps,
                          predictor="analytic", device=self.device, generator=gen)

    # -- the loop ------------------------------------------------------------------------------
    def fit(self, *, valid_batches: list | None = None, decode=None, metrics: Metrics | None = None,
            max_steps: int | None = None) -> TrainResult:
        """Train to recipe.train.steps (or `max_steps` more steps); save periodically, on signals and at the end."""
        tc = self.recipe.train
        end = tc.steps if max_steps is None else min(tc.steps, self.step + max_steps)
        result = TrainResult(start_step=self.step)
        flops = training_flops_per_token(matmul_params=self.model_cfg.num_params(self.layout.tp),
                                         num_layers=self.model_cfg.n_blocks, hidden=self.model_cfg.hidden_size,
                                         seq_len=self.recipe.data.seq_len)
        while self.step < end:
            started, self.data_wait = time.perf_counter(), 0.0
            loss = self.train_step()
            elapsed = time.perf_counter() - started
            opt = self.base_optimizer()
            result.losses.append(loss)
            if opt.last_skipped:
                result.skipped_steps += 1
                if metrics:
                    metrics.message(f"step {self.step}: non-finite loss or gradient, update skipped "
                                    f"({opt.skipped_in_a_row} in a row)")
                if opt.skipped_in_a_row >= tc.max_nonfinite_steps:
                    raise FloatingPointError(
                        f"{opt.skipped_in_a_row} consecutive steps had non-finite losses or gradients (step "
                        f"{self.step}); stopping. The last good checkpoint is kept in {self.checkpoints.root}: lower "
                        f"optim.lr or check the data, then resume.")
            if metrics:
                metrics.advance()
            if metrics and (self.step % tc.log_every == 0 or self.step == end):
                tokens_per_s = self.layout.global_batch * self.recipe.data.seq_len / elapsed
                scalars = {"train/loss_per_token": loss, "train/lr": self.engine.get_lr()[0],
                           "train/tokens_per_s": tokens_per_s, "train/samples_per_s": self.layout.global_batch / elapsed,
                           "train/model_tflops_per_s": flops * tokens_per_s / 1e12 / self.layout.world_size,
                           "train/skipped_steps": opt.skipped_total}
                norm = self.engine.get_global_grad_norm()
                if norm is not None:
                    scalars["train/grad_norm"] = float(norm)
                if tc.peak_tflops:
                    scalars["train/mfu"] = scalars["train/model_tflops_per_s"] / tc.peak_tflops
                scalars["train/data_wait_fraction"] = self.data_wait / elapsed
                if torch.cuda.is_available():
                    scalars["train/max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
                else:  # the process's peak resident memory (Linux reports KiB)
                    scalars["train/max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
                metrics.scalars(self.step, scalars)
            if valid_batches and (self.step % tc.eval_every == 0 or self.step == end):
                result.valid = self.validate(valid_batches, draws=tc.eval_draws)
                if metrics:
                    metrics.scalars(self.step, {"valid/elbo_nats_per_token": result.valid.nats_per_token,
                                                "valid/elbo_stderr": result.valid.stderr,
                                                "valid/perplexity_bound": result.valid.perplexity_bound})
                    texts = self.samples(2, steps=tc.sample_steps)
                    if decode is not None:
                        metrics.text(self.step, "samples", "\n\n---\n\n".join(decode(t.tolist()) for t in texts))
            if self.stop.any_rank(self.device):
                self.save()
                result.stopped_by_signal = True
                return result
            if self.step % tc.save_every == 0 or self.step == end:
                self.save()
        return result


def setup_and_build(recipe: Recipe, **kwargs) -> Trainer:
    """Process groups for the launched world, then a Trainer (used by `python -m sedd_scale.train`)."""
    layout, topology = ds_engine.setup(recipe)
    return Trainer(recipe, layout, topology, **kwargs)

