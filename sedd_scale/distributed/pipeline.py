"""The SEDD network as a DeepSpeed pipeline of megatron-core TP layers, and its training loss.

Stages exchange (h, c): the hidden state (sequence-first, this rank's share of the positions) and the noise-level
conditioning. The first stage takes (x_t, total_noise); the last stage ends with the output layer's modulated
features, and the loss
(`HeadLoss`) projects them through that layer's vocab-parallel head inside the fused, chunked
score entropy, with labels (x0, x_t, total_noise, rate) (rate: per sequence, or per token for prompt/response
rows). PP = 1 uses the same loss on `SEDD`.
"""
from __future__ import annotations

import sedd_scale.compat  # noqa: F401  (before megatron / deepspeed)

import torch
from deepspeed.pipe import LayerSpec, PipelineModule
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from torch import Tensor, nn

from sedd_scale.loss import HeadLossConfig, weighted_score_entropy_head
from sedd_scale.model import SEDD, Block, InputLayer, ModelConfig, OutputLayer
from sedd_scale.model.transformer import megatron_config


def head_loss_config(model: ModelConfig, objective: str | None = None,
                     chunk_size: int | None = None) -> HeadLossConfig:
    """The fused loss settings that match a model and the recipe's objective (None: the one of the model's
    parametrization, score_entropy or masked_ce; bf16-mixed: bf16 GEMM operands, fp32 accumulation; model.compile:
    the chunks' elementwise work compiled too; chunk_size None: chunks sized by the logits budget)."""
    if objective is None:
        objective = "masked_ce" if model.parametrization == "denoiser" else "score_entropy"
    return HeadLossConfig.for_graph(model.graph, model.num_tokens, objective=objective,
                                    scale_by_sigma=model.scale_by_sigma, chunk_size=chunk_size,
                                    gemm_dtype=torch.bfloat16 if model.precision == "bf16-mixed" else None,
                                    compile=model.compile)


def head_loss(output_layer: OutputLayer, features: Tensor, x0: Tensor, x_t: Tensor, total_noise: Tensor,
              rate: Tensor, cfg: HeadLossConfig) -> tuple[Tensor, Tensor]:
    """(mean over the micro-batch of sum_i rate * score_entropy_i, the per-sequence losses detached).

    `features`: the output layer's, sequence-first and split like the hidden state; the labels x0, x_t and `rate`
    are whole sequences. `rate`: rate(t) per sequence (B,), or a per-token weight (B, L) (conditional rows: 0 on the
    prompt, whose terms then count for nothing, in the loss and its gradient). The inputs are valid by construction
    (the trainer checks the loader's ids; noising yields x_t and total_noise > 0), so the fused loss skips its input
    checks and their host syncs.

    Sequence parallelism: the shards are gathered over TP (the backward reduce-scatters, so the loss leaves its
    hidden gradient unreduced). Context parallelism: this rank scores its chunk, the loss multiplied by cp (DeepSpeed
    averages gradients over DP x CP), and the per-sequence losses are summed over CP (`sedd_scale.model.sequence`).
    """
    linear, split = output_layer.linear, output_layer.split
    hidden = split.gather_sp(features).transpose(0, 1)  # (B, L_chunk, H)
    weight = split.local(rate) if rate.dim() == 2 else rate[:, None]
    scale = weight / x0.shape[0] if split.cp == 1 else weight * (split.cp / x0.shape[0])
    loss, per_token = weighted_score_entropy_head(hidden, linear.weight, linear.bias, split.local(x_t), split.local(x0),
                                                  total_noise, scale.to(hidden.dtype), cfg,
                                                  vocab_start=output_layer.vocab_start, check_inputs=False,
                                                  sequence_parallel=split.sequence_parallel)
    return loss, split.sum_cp((weight.to(per_token.dtype) * per_token).sum(1))


def scored_tokens(rate: Tensor) -> Tensor | None:
    """Per sequence, the positions a per-token weight scores (None for a per-sequence rate: every position)."""
    return (rate > 0).sum(1) if rate.dim() == 2 else None


class LossRecords:
    """(total noise, per-sequence loss, scored positions per sequence or None: all) of each training micro-batch
    since the trainer last took them."""

    def __init__(self):
        self._kept: list[tuple[Tensor, Tensor, Tensor | None]] = []

    def add(self, total_noise: Tensor, per_sequence: Tensor, scored: Tensor | None = None) -> None:
        """Keep one micro-batch's values when training (evaluation runs without gradients and is not kept)."""
        if torch.is_grad_enabled():
            self._kept.append((total_noise.detach(), per_sequence, scored))

    def take(self) -> list[tuple[Tensor, Tensor, Tensor | None]]:
        """What was kept since the last call (always empty on pipeline stages without the loss)."""
        out, self._kept = self._kept, []
        return out


class SEDDTrainModule(nn.Module):
    """PP = 1: (x0, x_t, total_noise, rate) -> the micro-batch loss through the fused head."""

    def __init__(self, model: SEDD, loss_cfg: HeadLossConfig):
        super().__init__()
        self.model, self.loss_cfg = model, loss_cfg
        self.records = LossRecords()

    def forward(self, x0: Tensor, x_t: Tensor, total_noise: Tensor, rate: Tensor) -> Tensor:
        """The loss to backpropagate."""
        h, c = self.model.hidden(x_t, total_noise)
        features = self.model.output_layer.features(h, c)
        loss, per_sequence = head_loss(self.model.output_layer, features, x0, x_t, total_noise, rate, self.loss_cfg)
        if self.training:
            self.records.add(total_noise, per_sequence, scored_tokens(rate))
        return loss


class InputStage(InputLayer):
    """(x_t, total_noise) -> (h, c)."""

    def forward(self, inputs: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:  # noqa: D102
        x_t, total_noise = inputs
        return super().forward(x_t, total_noise.detach())


class BlockStage(Block):
    """(h, c) -> (h, c)."""

    def forward(self, inputs: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:  # noqa: D102
        return super().forward(*inputs)


class OutputStage(OutputLayer):
    """(h, c) -> modulated features; the head projection happens inside the loss."""

    def forward(self, inputs: tuple[Tensor, Tensor]) -> Tensor:  # noqa: D102
        return self.features(*inputs)


class HeadLoss:
    """DeepSpeed pipeline loss_fn: needs the last stage's OutputStage, bound after construction."""

    def __init__(self, cfg: HeadLossConfig):
        self.cfg, self.output_stage = cfg, None
        self.records = LossRecords()

    def bind(self, pipe: PipelineModule) -> None:
        """Find this rank's OutputStage (present on the last pipeline stage only)."""
        stages = [m for m in pipe.modules() if isinstance(m, OutputStage)]
        self.output_stage = stages[0] if stages else None

    def __call__(self, features: Tensor, labels: tuple[Tensor, Tensor, Tensor, Tensor]) -> Tensor:
        if self.output_stage is None:
            raise RuntimeError("HeadLoss called on a rank without the output stage (not the last pipeline stage)")
        x0, x_t, total_noise, rate = labels
        loss, per_sequence = head_loss(self.output_stage, features, x0, x_t, total_noise.detach(), rate.detach(),
                                       self.cfg)
        if self.output_stage.training:
            self.records.add(total_noise, per_sequence, scored_tokens(rate))
        return loss


def build_pipeline(model: ModelConfig, topology: PipeModelDataParallelTopology, loss_cfg: HeadLossConfig,
                   device, sequence_parallel: bool = False) -> PipelineModule:
    """A PipelineModule over `topology`'s pipe axis; blocks are balanced across stages."""
    mcfg = megatron_config(model, device, sequence_parallel)
    layers = [LayerSpec(InputStage, model, mcfg, device),
              *[LayerSpec(BlockStage, model, mcfg, device) for _ in range(model.n_blocks)],
              LayerSpec(OutputStage, model, mcfg, device)]
    loss = HeadLoss(loss_cfg)
    pipe = PipelineModule(layers=layers, loss_fn=loss, topology=topology, partition_method="type:BlockStage",
                          activation_checkpoint_interval=0)
    loss.bind(pipe)
    return pipe
