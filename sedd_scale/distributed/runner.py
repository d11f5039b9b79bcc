"""Step runners: how the trainer drives DeepSpeed's engine for one layout, so the loop has no pipeline branches.

`PlainRunner` (PP = 1) runs micro-batches one by one through DeepSpeed's plain engine (forward, backward,
step); `PipelineRunner` (PP > 1) hands them to the pipeline engine's 1F1B schedule. Both build their module,
train one optimizer step, evaluate a loss, produce full-vocabulary log-scores for sampling, and name their
parameters by the model's keys (DeepSpeed names pipeline layers by index: input, blocks, output).

Under `model.compile` the pipeline runner compiles its stage's regions before the first transfer (`warm_up_stage`):
compiled lazily, stage k would compile while stage k + 1 waits for its activations, so the compile times of the
stages would add up along the pipeline instead of overlapping.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import sedd_scale.compat  # noqa: F401  (before megatron / deepspeed)

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from torch import Tensor

from sedd_scale.distributed import deepspeed_files as ds_files
from sedd_scale.distributed import engine as ds_engine
from sedd_scale.distributed import parallel
from sedd_scale.distributed.pipeline import LossRecords, SEDDTrainModule, build_pipeline
from sedd_scale.layout import Layout
from sedd_scale.loss import HeadLossConfig
from sedd_scale.model import SEDD, Block, ModelConfig
from sedd_scale.model.sequence import SequenceSplit

MicroBatch = tuple[Tensor, Tensor, Tensor, Tensor]
"""(x0, x_t, total_noise, rate): one noised micro-batch."""


def mean_over_cp(loss: Tensor) -> Tensor:
    """The whole sequences' loss from this context-parallel rank's: each scores its chunk of the positions, times CP
    (so that DeepSpeed's average over DP x CP sums the chunks), and their mean is the loss of the whole sequences."""
    split = SequenceSplit.current()
    return loss if split.cp == 1 else split.sum_cp(loss) / split.cp


@contextlib.contextmanager
def rng_kept():
    """Restore the default CPU and CUDA generators and megatron's tensor-parallel tracker on exit (what dropout
    draws from), so work inside leaves every random stream where it was."""
    tracker = tensor_parallel.get_cuda_rng_tracker()
    cpu, tracked = torch.get_rng_state(), dict(tracker.get_states())
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        tracker.set_states(tracked)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)


def warm_up_stage(pipe, batch: MicroBatch, model_cfg: ModelConfig, device) -> None:
    """Run this stage's layers (and the loss on the last stage) once on `batch` as the 1F1B schedule runs them,
    forward and backward, then once as evaluation does (eval mode, no gradients), so every compiled region they call
    is compiled before the first pipeline transfer.

    A forward alone is not enough: under no_grad torch.compile builds an inference graph (no backward), and
    activation checkpointing runs the regions with gradients only in backward's recomputation (which needs a real
    .backward(), not autograd.grad). It runs before DeepSpeed wraps the module, so no optimizer or gradient hook sees
    it; the gradients it leaves are dropped, the RNG streams, mode and micro-batch counter restored and the loss
    records discarded: training is bitwise the same with and without it. Every stage makes its own inputs (zeros of
    the exchanged shapes: values do not matter to a compile), so no transfer happens.
    """
    x0, x_t, total_noise, rate = batch
    params = [p for p in pipe.parameters() if p.requires_grad]
    if any(p.grad is not None for p in params):
        raise RuntimeError("warm_up_stage runs on a freshly built pipeline (its parameters hold gradients)")
    if pipe.stage_id == 0:
        buffers = (x_t, total_noise)  # the engine loads them without gradients (no reentrant checkpointing)
    else:  # received (h, c): the engine makes floating buffers require grad, in the parameters' dtype here
        split = next(m.split for m in pipe.modules() if isinstance(m, Block))
        length = split.local_length(x_t.shape[1])  # sequence-first, this rank's share
        buffers = (torch.zeros(length, x_t.shape[0], model_cfg.hidden_size, dtype=model_cfg.params_dtype,
                               device=device),
                   torch.zeros(x_t.shape[0], model_cfg.cond_dim, dtype=model_cfg.params_dtype, device=device))
        for t in buffers:
            t.requires_grad_(True)
    last = pipe.stage_id == pipe.num_stages - 1
    was_training, micro_offset = pipe.training, pipe.micro_offset
    try:
        with rng_kept():
            for training in (True, False):
                pipe.train(training)
                with torch.set_grad_enabled(training):
                    inputs = tuple(t.clone() for t in buffers)  # as the engine's forward pass takes them
                    outputs = pipe(inputs)
                    if last:
                        outputs = pipe.loss_fn(outputs, (x0, x_t, total_noise, rate))
                    if training:
                        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
                        torch.autograd.backward(outputs, [torch.ones_like(t) for t in outputs])
    finally:
        pipe.train(was_training)
        pipe.micro_offset = micro_offset
        for p in params:
            p.grad = None
        if last:
            pipe.loss_fn.records.take()


class PlainRunner:
    """PP = 1: the SEDD module with the fused loss under DeepSpeed's plain engine (ZeRO 0-3). Its regions compile at
    the first step (`warm_up` is not used: with one stage nobody waits for the compile)."""

    def __init__(self, model_cfg: ModelConfig, recipe, layout: Layout, topology, loss_cfg: HeadLossConfig,
                 device, warm_up: MicroBatch | None = None):
        self.model_cfg, self.layout, self.device = model_cfg, layout, device
        module = SEDDTrainModule(SEDD(model_cfg, device, sequence_parallel=recipe.parallel.sequence_parallel), loss_cfg)
        self.engine = ds_engine.build_engine(module, recipe, layout)

    @property
    def records(self) -> LossRecords:
        """The per-sequence losses of the training micro-batches since the last `take()`."""
        return self.engine.module.records

    def train_batch(self, micro_batches: Iterator[MicroBatch]) -> Tensor:
        """One optimizer step over `layout.grad_accum` micro-batches; the loss averaged over them and DP."""
        losses = []
        for x0, x_t, total_noise, rate in micro_batches:
            loss = self.engine(x0, x_t, total_noise, rate)
            self.engine.backward(loss)
            self.engine.step()
            losses.append(loss.detach().float())
        loss = torch.stack(losses).mean()
        # Each context-parallel rank's loss is CP times its positions' share (DeepSpeed averages gradients over
        # DP x CP): the mean over DP x CP is the DP mean of the whole sequences' losses.
        dist.all_reduce(loss, group=ps.get_data_parallel_group(with_context_parallel=True))
        return loss / self.layout.data_group_size

    def eval_loss(self, x0: Tensor, x_t: Tensor, total_noise: Tensor, rate: Tensor) -> float:
        """The micro-batch loss (mean over rows of rate * sum_i score entropy), the same on every rank."""
        return float(mean_over_cp(self.engine.module(x0, x_t, total_noise, rate).float()))

    def log_scores(self, x: Tensor, total: Tensor) -> Tensor:
        """Full-vocabulary log-scores (the TP shards gathered), for sampling."""
        model: SEDD = self.engine.module.model
        model.eval()
        return parallel.gather_tp(model(x, total.float()))

    def model_key(self, name: str) -> str:
        """The model's key of a parameter DeepSpeed names `name`."""
        return ds_files.model_key(name, self.model_cfg.n_blocks, pipelined=False)


class PipelineRunner:
    """PP > 1: DeepSpeed's PipelineModule of megatron-core TP layers (1F1B schedule, ZeRO 0-1).

    `warm_up`: a micro-batch of the training shape; under model.compile the stage compiles its regions on it before
    the engine exists (`warm_up_stage`), so that the stages compile at the same time, not one after the other.
    """

    def __init__(self, model_cfg: ModelConfig, recipe, layout: Layout, topology, loss_cfg: HeadLossConfig,
                 device, warm_up: MicroBatch | None = None):
        self.model_cfg, self.layout, self.device = model_cfg, layout, device
        pipe = build_pipeline(model_cfg, topology, loss_cfg, device, recipe.parallel.sequence_parallel)
        if warm_up is not None and model_cfg.compile:
            warm_up_stage(pipe, warm_up, model_cfg, device)
        self.engine = ds_engine.build_engine(pipe, recipe, layout)

    @property
    def records(self) -> LossRecords:
        """The per-sequence losses of the training micro-batches since the last `take()` (last stage only)."""
        return self.engine.module.loss_fn.records

    def train_batch(self, micro_batches: Iterator[MicroBatch]) -> Tensor:
        """One optimizer step through the 1F1B schedule; DeepSpeed averages the loss over micro-batches and DP."""
        data = (((x_t, total_noise), (x0, x_t, total_noise, rate)) for x0, x_t, total_noise, rate in micro_batches)
        return self.engine.train_batch(data_iter=data).detach().float()

    def _last_stage_src(self) -> tuple[int, object]:
        group = ps.get_pipeline_model_parallel_group()
        return dist.get_process_group_ranks(group)[-1], group

    def eval_loss(self, x0: Tensor, x_t: Tensor, total_noise: Tensor, rate: Tensor) -> float:
        """The micro-batch loss through the stages, broadcast from the last stage to every stage."""
        # Stages cache the shapes they exchange; evaluation batches may differ from training's.
        self.engine.reset_activation_shape()
        batch = iter([((x_t, total_noise), (x0, x_t, total_noise, rate))])
        # No reduction: the engine would average over DP ranks, which evaluate different batches.
        out = self.engine.eval_batch(batch, num_micro_batches=1, reduce_output=None, bcast_loss=False)
        self.engine.reset_activation_shape()
        value = torch.zeros(1, dtype=torch.float64, device=self.device)
        if self.engine.is_last_stage():
            value[0] = float(out[0])
        src, group = self._last_stage_src()
        dist.broadcast(value, src=src, group=group)
        return float(mean_over_cp(value))

    def log_scores(self, x: Tensor, total: Tensor) -> Tensor:
        """Full-vocabulary log-scores through the pipeline, made on the last stage and sent to every stage."""
        total = total.float()
        self.engine.reset_activation_shape()
        # The engine also evaluates the loss (its running total breaks without one); the labels are
        # placeholders of the right kinds and the value is discarded.
        batch = iter([((x, total), (torch.zeros_like(x), x, total, torch.ones_like(total)))])
        _, features = self.engine.eval_batch(batch, return_logits=True, bcast_loss=False, num_micro_batches=1)
        self.engine.reset_activation_shape()
        stage = self.engine.module.loss_fn.output_stage
        if stage is not None:  # the last stage
            out = parallel.gather_tp(stage.log_score(stage.raw(features), x, total))
        else:
            out = torch.empty(*x.shape, self.model_cfg.padded_vocab(self.layout.tp), device=self.device)
        src, group = self._last_stage_src()
        dist.broadcast(out, src=src, group=group)
        return out

    def model_key(self, name: str) -> str:
        """The model's key of a parameter DeepSpeed names `name` (layers by index: input, blocks, output)."""
        return ds_files.model_key(name, self.model_cfg.n_blocks, pipelined=True)


Runner = PlainRunner | PipelineRunner


def build_runner(model_cfg: ModelConfig, recipe, layout: Layout, topology, loss_cfg: HeadLossConfig,
                 device, warm_up: MicroBatch | None = None) -> Runner:
    """The runner for `layout`: the pipeline engine when PP > 1, else the plain one (`warm_up`: see PipelineRunner)."""
    cls = PipelineRunner if layout.pp > 1 else PlainRunner
    return cls(model_cfg, recipe, layout, topology, loss_cfg, device, warm_up)
