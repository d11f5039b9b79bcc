"""Training recipes: YAML files turned into typed, validated, nested dataclass configs.

A recipe is a YAML mapping whose sections mirror `Recipe`'s fields. Loading checks every key
(unknown keys are refused with a suggestion and their dotted path), every value's type, and each
section's own `__post_init__` rules; `Recipe.layout(world_size)` then resolves and checks the
parallel layout. Command-line overrides use the same paths: `--set optim.lr=1e-4`.

    python -m sedd_scale.config recipes/cpu-tiny.yaml --world-size 2 --set parallel.tp=2
prints the resolved layout (or the reason it is impossible) without starting anything, with the layout
planner's estimates per GPU (`sedd_scale/plan/`: memory, pipeline bubble, step time, MFU, warnings);
`--gpu h100|a100|h200` picks the GPU and `--propose` lists the layouts that fit the world size.
"""
from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sedd_scale.config.typed import from_dict
from sedd_scale.config.yaml_loader import RecipeError, apply_overrides, parse_yaml
from sedd_scale.data.tokenizer import TOKENIZERS, tokenizer_vocab_size
from sedd_scale.diffusion.noise import SCHEDULES, Noise, get_noise, noise_spec
from sedd_scale.diffusion.samplers import parse_sampler
from sedd_scale.layout import Layout, check_zero_with_pipeline, divisors
from sedd_scale.loss.objectives import OBJECTIVES, head_objective, parametrization_of
from sedd_scale.model.config import ModelConfig


# ---------------------------------------------------------------------------------------------
# The recipe's sections.
@dataclass
class DiffusionConfig:
    """Forward-process noise schedule and the training time range (the graph is `model.graph`).

    `noise` names a registered schedule (`sedd_scale.diffusion.noise.SCHEDULES`); the schedule validates its
    own parameters, read from the keys its `recipe_keys` names."""

    noise: str = "loglinear"  # the noise schedule: loglinear or geometric (`diffusion.noise.SCHEDULES`)
    noise_eps: float = 1e-3  # loglinear
    sigma_min: float = 1e-4  # geometric
    sigma_max: float = 20.0  # geometric
    sampling_eps: float = 1e-3  # training draws t ~ U[sampling_eps, 1] (the reference's name)
    stratified: bool = False  # one t per stratum of the global micro-batch (the reference draws i.i.d.)
    # The training objective fused with the head (`sedd_scale.loss.OBJECTIVES`): score_entropy (SEDD; log-ratio
    # outputs) or masked_ce (absorb only: MDLM's masked cross-entropy; needs model.parametrization: denoiser and
    # model.scale_by_sigma: false).
    objective: str = "score_entropy"

    def __post_init__(self):
        objectives = sorted({name for name, _ in OBJECTIVES})
        if self.objective not in objectives:
            raise ValueError(f"objective: unknown {self.objective!r}; choose one of {objectives}")
        if not 0.0 < self.sampling_eps < 1.0:
            raise ValueError(f"sampling_eps must be in (0, 1), got {self.sampling_eps}")
        if self.noise not in SCHEDULES:
            raise ValueError(f"noise: unknown schedule {self.noise!r}; choose one of {sorted(SCHEDULES)}")
        try:
            self.schedule()
        except ValueError as e:  # the schedule's own message, named by the recipe's keys
            keys = SCHEDULES[self.noise].recipe_keys
            message = str(e)
            for param, key in sorted(keys.items(), key=lambda kv: -len(kv[0])):
                message = re.sub(rf"\b{param}\b", key, message)
            raise ValueError(message) from None

    def schedule(self) -> Noise:
        """The noise schedule this section selects."""
        return get_noise(self.noise, **self.noise_kwargs())

    def noise_kwargs(self) -> dict[str, float]:
        """Keyword arguments of `get_noise(self.noise, ...)`: the schedule's parameters from their recipe keys."""
        return {param: getattr(self, key) for param, key in SCHEDULES[self.noise].recipe_keys.items()}

    def noise_spec(self) -> dict[str, Any]:
        """The schedule as checkpoints record it: {"type": self.noise, **noise_kwargs()}."""
        return noise_spec(self.schedule())

    @staticmethod
    def section_for(spec: dict[str, Any]) -> dict[str, Any]:
        """The recipe's `diffusion` keys that select the schedule `spec` (a `noise_spec()`)."""
        keys = SCHEDULES[spec["type"]].recipe_keys
        return {"noise": spec["type"], **{key: spec[param] for param, key in keys.items()}}


@dataclass
class DataConfig:
    """Token data: datasets written by tools/prepare_data.py (a manifest.json with train/valid splits)."""

    manifests: list[str]  # manifest.json paths whose train splits are blended by `weights`
    weights: list[float] | None = None  # blend weights, one per manifest (None: by sequence count)
    valid: str | None = None  # manifest whose valid split is evaluated (None: the first manifest)
    prepare: str | None = None  # built-in corpus (ptb, bible, wiki) prepared into manifests[0] when missing
    # The tokenizer the data was (or is to be) prepared with: gpt2, byte or the path of a Hugging Face
    # tokenizer.json; null for data written some other way, which the loader then checks against
    # model.num_tokens through its manifest alone.
    tokenizer: str | None = "gpt2"
    seq_len: int = 1024  # tokens per sequence (equal to model.length)
    num_workers: int = 2  # data-loader worker processes per rank
    skip_corrupt: bool = False  # leave out shards that are missing or of the wrong size at start (listed, counted)
    cache_dir: str | None = None  # where shards given as URLs are fetched to (None: $SEDD_CACHE/shards)

    def __post_init__(self):
        if not self.manifests:
            raise ValueError("manifests needs at least one manifest.json path")
        if self.tokenizer is not None and self.tokenizer not in TOKENIZERS and not self.tokenizer.endswith(".json"):
            raise ValueError(f"unknown tokenizer (data.tokenizer: {self.tokenizer!r} is not one of "
                             f"{list(TOKENIZERS)} nor a path ending in .json): name a built-in tokenizer or the "
                             "path of a Hugging Face tokenizer.json")
        if self.weights is not None:
            if len(self.weights) != len(self.manifests):
                raise ValueError(f"weights has {len(self.weights)} entries for {len(self.manifests)} manifests")
            if any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
                raise ValueError(f"weights must be >= 0 with a positive sum, got {self.weights}")
        if self.seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {self.seq_len}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")


@dataclass
class OptimConfig:
    """AdamW with linear warmup, then a constant or cosine learning rate (paper defaults)."""

    lr: float = 3e-4  # peak learning rate
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW moment decays
    eps: float = 1e-8  # AdamW denominator epsilon
    weight_decay: float = 0.0  # decoupled (AdamW) weight decay
    warmup: int = 2500  # optimizer steps of linear warmup from 0
    schedule: Literal["constant", "cosine"] = "constant"  # the learning rate after warmup
    min_lr: float = 0.0  # the cosine schedule's floor
    grad_clip: float = 1.0  # global gradient norm; 0 disables clipping

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be in [0, 1), got {self.betas}")
        if self.eps <= 0 or self.weight_decay < 0 or self.warmup < 0 or self.grad_clip < 0:
            raise ValueError("eps must be > 0 and weight_decay, warmup, grad_clip >= 0, got "
                             f"eps={self.eps}, weight_decay={self.weight_decay}, warmup={self.warmup}, "
                             f"grad_clip={self.grad_clip}")
        if not 0.0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr must be in [0, lr={self.lr}], got {self.min_lr}")

    def lr_at(self, step: int, total_steps: int) -> float:
        """Learning rate for optimizer step `step` (0-based) of `total_steps`: the reference's
        lr * min(step / warmup, 1)."""
        if self.warmup and step < self.warmup:
            return self.lr * step / self.warmup
        if self.schedule == "constant":
            return self.lr
        progress = min(1.0, (step - self.warmup) / max(1, total_steps - self.warmup))
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))


@dataclass
class ParallelConfig:
    """Tensor x context x pipeline x data parallelism (DP is what the world size leaves), ZeRO, batch sizes."""

    tp: int = 1  # tensor-parallel size (divides model.n_heads; within a node)
    pp: int = 1  # pipeline stages (divides model.n_blocks)
    zero_stage: int = 1  # DeepSpeed ZeRO stage 0-3 (1 with pp > 1)
    # megatron-core sequence parallelism (needs tp > 1): norms, modulation, dropout and the residual stream split
    # along the sequence over the TP group (TP times less of that activation memory; the TP all-reduces become
    # reduce-scatters and all-gathers of the same volume)
    sequence_parallel: bool = False
    micro_batch: int = 1  # sequences per rank per forward
    global_batch: int = 512  # sequences per optimizer step over all data-parallel ranks
    # How long a collective may wait before the run fails, in every process group (torch's default group,
    # megatron-core's, DeepSpeed's pipeline groups): Megatron-LM's --distributed-timeout-minutes. Raise it when
    # ranks legitimately wait longer (rank 0 committing a checkpoint, first compiles of many pipeline stages).
    distributed_timeout_minutes: int = 10
    # ZeRO-1/2/3 reduce each bucket of gradients on a side stream while the backward goes on (DeepSpeed's
    # zero_optimization.overlap_comm; DeepSpeed's own default is off below ZeRO-3). Not with pp > 1, where
    # DeepSpeed's pipeline engine does not support it (the engine passes false there), nor with bf16 weights
    # under ZeRO-1 (BF16_Optimizer all-reduces after the backward) or ZeRO-0 (no ZeRO optimizer).
    zero_overlap_comm: bool = True
    # ZeRO copies each gradient into its reduce bucket as it is produced (zero_optimization.contiguous_gradients,
    # DeepSpeed's default): no fragmentation of the gradient memory, and the bucket is reduced in one call.
    zero_contiguous_gradients: bool = True
    # Elements per ZeRO reduce bucket (zero_optimization.reduce_bucket_size). Allocated whole, however small the
    # model, once per gradient dtype and twice with zero_overlap_comm below ZeRO-3 (one bucket fills while the
    # other is reduced). 2e8 (DeepSpeed's 5e8 default, Megatron-DeepSpeed's examples' 5e8, is 1 GB of bf16 per
    # bucket): two 2e8-element buckets take less than one 5e8 one, and the last bucket, which no backward hides,
    # is 0.4 GB of bf16, about 8 ms at 50 GB/s per rank (a 7B model's DP ring across nodes at TP 8, 1,024
    # GPUs); a collective of that size runs near NCCL's peak bus bandwidth, which much smaller buckets would lose.
    zero_reduce_bucket_size: int = 200_000_000
    # Elements of ZeRO-3 parameters all-gathered ahead of the module that needs them
    # (zero_optimization.stage3_prefetch_bucket_size, DeepSpeed's default 5e7: 0.1 GB of bf16, a 7B block's
    # TP1 weights in about four steps); 0 turns prefetching off. ZeRO-3 only.
    zero_prefetch_bucket_size: int = 50_000_000
    # Context parallelism for long sequences: each sequence's positions split over this many ranks (attention
    # exchanges heads for positions, DeepSpeed-Ulysses); they share their DP rank's rows. world = tp x cp x pp x dp;
    # tp x cp divides model.n_heads, cp divides data.seq_len; ZeRO partitions over DP x CP.
    context_parallel: int = 1

    def __post_init__(self):
        if self.context_parallel < 1:
            raise ValueError(f"context_parallel must be >= 1, got {self.context_parallel}")
        for key, low in (("zero_reduce_bucket_size", 1), ("zero_prefetch_bucket_size", 0)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"parallel.{key} must be an integer number of elements >= {low}, got {value!r}; "
                                 f"set e.g. parallel.{key}: {getattr(ParallelConfig, key)}")
        if self.distributed_timeout_minutes < 1:
            raise ValueError(f"distributed_timeout_minutes must be >= 1, got {self.distributed_timeout_minutes}")
        if self.tp < 1 or self.pp < 1:
            raise ValueError(f"tp and pp must be >= 1, got tp={self.tp}, pp={self.pp}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        check_zero_with_pipeline(self.zero_stage, self.pp)
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("sequence_parallel splits activations over the tensor-parallel group: it needs tp > 1 "
                             "(set parallel.tp or sequence_parallel: false)")
        if self.micro_batch < 1 or self.global_batch < 1:
            raise ValueError(f"micro_batch and global_batch must be >= 1, got {self.micro_batch}, {self.global_batch}")


@dataclass
class WandbConfig:
    """An optional Weights & Biases run beside tensorboard (rank 0; `pip install sedd-scale[wandb]`): the same
    scalars at the same steps, the recipe as its config; a resumed run continues the same W&B run."""

    project: str | None = None  # the W&B project; null: no W&B logging
    entity: str | None = None  # the W&B team or user (null: the logged-in account's default)
    name: str | None = None  # the run's display name (null: the run directory's name)
    # online, offline (written under `dir`, uploaded later with `wandb sync`) or disabled; null: WANDB_MODE,
    # else online
    mode: Literal["online", "offline", "disabled"] | None = None
    dir: str | None = None  # where W&B writes its files (null: the run directory)

    @property
    def enabled(self) -> bool:
        """Whether this section asks for a W&B run."""
        return self.project is not None and self.mode != "disabled"


@dataclass
class TrainConfig:
    """The training loop: length, EMA, seeds, intervals and safety limits."""

    steps: int = 1000  # optimizer steps (precision and activation checkpointing are model settings)
    ema: float = 0.9999  # decay, warmed up as min(ema, (1+n)/(10+n)) like the reference
    seed: int = 0  # seeds the data order, the noise of every step and the weights
    log_every: int = 50  # steps between metric lines (tensorboard, metrics.jsonl)
    eval_every: int = 100  # steps between validation ELBOs and example samples
    save_every: int = 1000  # steps between checkpoints
    keep_last: int = 3  # checkpoints kept on disk
    max_nonfinite_steps: int = 10  # consecutive skipped steps (non-finite loss/grad) before stopping
    peak_tflops: float | None = None  # per-device peak for MFU (e.g. 989 for H100 bf16 dense); None: no MFU
    eval_batches: int = 4  # validation micro-batches per rank for the ELBO at each evaluation
    eval_draws: int = 4  # Monte-Carlo t draws per validation sequence (stratified)
    sample_steps: int = 64  # sampler steps of the example texts written at each evaluation
    # Their sampler, NAME[:key=value,...] (sedd_scale/diffusion/samplers; e.g. "cached", "confidence:threshold=0.9")
    sampler: str = "analytic"
    # Periodic checkpoints are copied to host memory and written by a background thread while
    # training continues (the pre-emption checkpoint is always written synchronously).
    async_save: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)  # Weights & Biases logging (off unless a project is set)

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"ema must be in [0, 1), got {self.ema}")
        for name in ("log_every", "eval_every", "save_every", "keep_last", "max_nonfinite_steps", "eval_batches",
                     "sample_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        try:
            parse_sampler(self.sampler)
        except ValueError as e:
            raise ValueError(f"sampler {self.sampler!r}: {e}") from None
        if self.eval_draws < 2:
            raise ValueError(f"eval_draws must be >= 2 (a standard error needs two draws), got {self.eval_draws}")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ValueError(f"peak_tflops must be > 0 (or null), got {self.peak_tflops}")


@dataclass
class CheckpointConfig:
    """Where the run writes checkpoints (and logs), and whether it resumes from them."""

    dir: str = "runs/default"  # the run directory: checkpoints, logs, samples
    resume: bool = True  # continue from the latest checkpoint in `dir` when there is one
    # With resume false, a directory that already holds checkpoints is refused unless this is true:
    # then its checkpoints are deleted and its logs restart at step 0.
    start_over: bool = False
    # A consolidated or hub directory (tools/convert_checkpoint.py consolidate / export) whose weights a fresh run
    # starts from, in this run's layout: step 0, a fresh optimizer, the EMA set to them (fine-tuning, e.g. SFT). The
    # model must match the recipe's. Ignored once checkpoint.dir holds a checkpoint: the run resumes from that.
    init_from: str | None = None

    def __post_init__(self):
        if self.init_from is not None and not str(self.init_from).strip():
            raise ValueError("checkpoint.init_from is empty: name a consolidated or hub directory, or leave it out")
        if self.start_over and self.resume:
            raise ValueError("start_over=true discards the run's checkpoints: it needs resume=false")


@dataclass
class Recipe:
    """A whole training run."""

    model: ModelConfig
    data: DataConfig
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self):
        tp, pp, m = self.parallel.tp, self.parallel.pp, self.model
        try:
            m.check_tp(tp)
        except ValueError as e:
            raise ValueError(f"parallel.tp={tp}: {e}") from None
        if m.n_blocks % pp:
            raise ValueError(f"parallel.pp={pp} does not divide model.n_blocks={m.n_blocks}: "
                             f"choose pp among {divisors(m.n_blocks)}")
        self._check_sequence_split()
        if m.precision == "bf16" and self.parallel.zero_stage == 0:
            # Without ZeRO DeepSpeed wraps bf16 weights in another optimizer, whose state nothing here reads.
            raise ValueError("model.precision=bf16 keeps fp32 master weights in DeepSpeed's bf16 optimizer, which "
                             "runs under ZeRO: set parallel.zero_stage: 1 (it costs nothing on one GPU)")
        objective = self.diffusion.objective
        try:
            head_objective(objective, m.graph, m.num_tokens, scale_by_sigma=m.scale_by_sigma)
        except ValueError as e:
            raise ValueError(f"diffusion.objective={objective!r} with model.graph={m.graph!r}: {e}") from None
        trains = parametrization_of(objective)
        if m.parametrization != trains:
            raise ValueError(f"diffusion.objective={objective!r} trains the network's output as {trains} but "
                             f"model.parametrization={m.parametrization!r}: set model.parametrization: {trains} (or "
                             "choose the objective of that parametrization: score_entropy for ratios, masked_ce for "
                             "denoiser)")
        try:
            parse_sampler(self.train.sampler).check_graph(m.graph)
        except ValueError as e:
            raise ValueError(f"train.sampler={self.train.sampler!r}: {e}") from None
        if m.length != self.data.seq_len:
            raise ValueError(f"model.length={m.length} differs from data.seq_len={self.data.seq_len}: set both "
                             "to the sequence length the data was prepared with")
        vocab = tokenizer_vocab_size(self.data.tokenizer) if self.data.tokenizer else m.num_tokens
        if m.num_tokens != vocab:
            raise ValueError(f"model.num_tokens={m.num_tokens} does not match data.tokenizer "
                             f"'{self.data.tokenizer}' ({vocab} tokens): set model.num_tokens: {vocab}")

    def _check_sequence_split(self) -> None:
        """Context parallelism splits heads over TP x CP ranks (Ulysses) and positions over CP; sequence parallelism
        positions over TP x CP: refuse sizes that do not divide them."""
        tp, cp, p = self.parallel.tp, self.parallel.context_parallel, self.parallel
        heads, seq_len = self.model.n_heads, self.data.seq_len
        valid = [c for c in divisors(heads // tp) if seq_len % c == 0] if heads % tp == 0 else [1]
        if cp > 1 and heads % (tp * cp):
            raise ValueError(f"parallel.context_parallel={cp} with tp={tp}: attention splits model.n_heads={heads} "
                             f"over tp x context_parallel = {tp * cp} ranks, which does not divide it: choose "
                             f"context_parallel among {valid}")
        if cp > 1 and seq_len % cp:
            raise ValueError(f"parallel.context_parallel={cp} does not divide data.seq_len={seq_len}: choose "
                             f"context_parallel among {valid}")
        if p.sequence_parallel and seq_len % (tp * cp):
            raise ValueError(f"parallel.sequence_parallel splits data.seq_len={seq_len} over tp x context_parallel "
                             f"= {tp}*{cp} = {tp * cp} ranks, which does not divide it: choose a seq_len that is a "
                             "multiple of it, or sequence_parallel: false")

    def layout(self, world_size: int) -> Layout:
        """Resolve DP and gradient accumulation for `world_size` ranks; RecipeError if impossible."""
        p = self.parallel
        try:
            return Layout.resolve(world_size, tp=p.tp, pp=p.pp, zero_stage=p.zero_stage, micro_batch=p.micro_batch,
                                  global_batch=p.global_batch, cp=p.context_parallel, sp=p.sequence_parallel)
        except ValueError as e:
            raise RecipeError(str(e)) from None


def packaged_recipes() -> dict[str, Path]:
    """{name: path} of the recipes shipped inside the package (`sedd_scale/recipes/NAME.yaml`)."""
    folder = Path(__file__).resolve().parents[1] / "recipes"
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def find_recipe(spec: str | Path) -> Path:
    """The recipe file `spec` names: a path, or the name of a packaged recipe (`cpu-tiny`, `sedd-small`, ...)."""
    path = Path(spec)
    if path.is_file():
        return path
    packaged = packaged_recipes()
    if str(spec) in packaged:
        return packaged[str(spec)]
    raise RecipeError(f"recipe file {str(path)!r} not found, and no packaged recipe is named so: give the path of a "
                      f"YAML recipe or one of {sorted(packaged)}")


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read a recipe (a YAML path or a packaged recipe's name), apply `key.path=value` overrides, validate it."""
    path = find_recipe(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): save the recipe as UTF-8"
                          ) from None
    data = parse_yaml(text, str(path))
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping of sections, got {type(data).__name__}")
    try:
        return from_dict(Recipe, apply_overrides(data, list(overrides)))
    except RecipeError as e:
        raise RecipeError(f"{path}: {e}") from None


def add_recipe_args(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    """Add the `recipe` positional and repeatable `--set key=value` options to a parser."""
    parser.add_argument("recipe", nargs=None if default is None else "?", default=default, help="recipe YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        nargs="+", help="override recipe values, e.g. --set optim.lr=1e-4 parallel.tp=2")


def overrides_from_args(args: argparse.Namespace) -> list[str]:
    """The flat list of `--set` overrides (each `--set` may carry several)."""
    return [o for group in args.overrides for o in group]
