"""Training recipes: YAML files turned into typed, validated, nested dataclass configs.

A recipe is a YAML mapping whose sections mirror `Recipe`'s fields. Loading checks every key
(unknown keys are refused with a suggestion and their dotted path), every value's type, and each
section's own `__post_init__` rules; `Recipe.layout(world_size)` then resolves and checks the
parallel layout. Command-line overrides use the same paths: `--set optim.lr=1e-4`.

    python -m sedd_scale.config recipes/cpu-tiny.yaml --world-size 2 --set parallel.tp=2
prints the resolved layout (or the reason it is impossible) without starting anything, with the layout
planner's estimates per GPU (`sedd_scale/planner.py`: memory, pipeline bubble, step time, MFU, warnings);
`--gpu h100|a100|h200` picks the GPU and `--propose` lists the layouts that fit the world size.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from sedd_scale.data.tokenizer import TOKENIZERS, tokenizer_vocab_size
from sedd_scale.model.config import ModelConfig


class RecipeError(ValueError):
    """A recipe that cannot be used: the message names the key and the fix."""


# ---------------------------------------------------------------------------------------------
# YAML: PyYAML follows YAML 1.1, where `3e-4` (no dot) is a string; recipes mean a float.
class _Loader(yaml.SafeLoader):
    pass


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+][0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def _mapping_without_duplicates(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    # PyYAML keeps the last of two equal keys; in a recipe that silently drops a setting.
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while reading a mapping", node.start_mark,
                f"found the key {key!r} twice (first on line {seen[key].start_mark.line + 1}): "
                "keep one of them", key_node.start_mark)
        seen[key] = key_node
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def parse_yaml(text: str, source: str = "<text>") -> Any:
    """Parse YAML text, reading `1e-4`-style numbers as floats; a syntax error or a duplicate key is a
    RecipeError naming `source` and the line."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else source
        problem = getattr(e, "problem", None) or str(e)
        context = getattr(e, "context", None)
        raise RecipeError(f"{where}: {problem}{f' ({context})' if context else ''}: fix the YAML") from None


# ---------------------------------------------------------------------------------------------
# Generic dict -> dataclass conversion with type checks.
def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against the annotation `tp` and return it converted (dataclasses built)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin is Literal:
        if value not in args:
            raise RecipeError(f"{path}: {value!r} is not one of {list(args)}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arm in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arm, path)
            except RecipeError as e:
                errors.append(str(e))
        raise RecipeError(errors[0] if len(errors) == 1 else f"{path}: {value!r} does not fit {_type_name(tp)}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{path}: expected a list ({_type_name(tp)}), got {value!r}")
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise RecipeError(f"{path}: expected {len(args)} items ({_type_name(tp)}), got {value!r}")
            return tuple(_convert(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{path}: expected a number, got {value!r}")
        if not math.isfinite(value):  # .inf / .nan in YAML: no setting of a recipe means that
            raise RecipeError(f"{path}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{path}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{path}: unsupported annotation {tp!r} in a config dataclass")


def _unknown_key(key: str, known: list[str], path: str) -> RecipeError:
    where = f"{path}.{key}" if path else key
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean '{path + '.' if path else ''}{close[0]}'?" if close else f"known keys: {', '.join(known)}"
    return RecipeError(f"unknown key '{where}'; {hint}")


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass `cls` from a mapping, checking keys and types; errors carry the dotted path."""
    where = path or "recipe"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise _unknown_key(str(key), list(fields), path)
        kwargs[key] = _convert(value, hints[key], f"{path}.{key}" if path else key)
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecipeError(f"missing required key '{path + '.' if path else ''}{name}'")
    try:
        return cls(**kwargs)
    except RecipeError:
        raise
    except (ValueError, TypeError) as e:  # a section's own __post_init__ rule
        raise RecipeError(f"{path}: {e}" if path else str(e)) from e


def to_dict(obj: Any) -> Any:
    """A dataclass config (or nested values) as plain YAML-safe data."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides (values parsed as YAML) to a raw recipe mapping, in place."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"override {item!r} is not of the form section.key=value (e.g. optim.lr=1e-4)")
        parts = key.strip().split(".")
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"override {item!r}: '{'.'.join(parts[:i + 1])}' is a value, not a section")
            node = child
        node[parts[-1]] = parse_yaml(text, f"override {item!r}")
    return data


# ---------------------------------------------------------------------------------------------
# The recipe's sections.
def _check_zero_with_pipeline(zero_stage: int, pp: int) -> None:
    if pp > 1 and zero_stage > 1:
        raise ValueError(f"zero_stage {zero_stage} with pp={pp}: DeepSpeed's pipeline engine supports ZeRO-1 only "
                         "(ZeRO-2/3 partition gradients/parameters, which its schedule does not handle): "
                         "use zero_stage 1 or pp 1")


@dataclass
class DiffusionConfig:
    """Forward-process noise schedule and the training time range (the graph is `model.graph`)."""

    noise: Literal["loglinear", "geometric"] = "loglinear"
    noise_eps: float = 1e-3  # loglinear
    sigma_min: float = 1e-4  # geometric
    sigma_max: float = 20.0  # geometric
    sampling_eps: float = 1e-3  # training draws t ~ U[sampling_eps, 1] (the reference's name)
    stratified: bool = False  # one t per stratum of the global micro-batch (the reference draws i.i.d.)

    def __post_init__(self):
        if not 0.0 < self.sampling_eps < 1.0:
            raise ValueError(f"sampling_eps must be in (0, 1), got {self.sampling_eps}")
        if self.noise == "loglinear" and not 0.0 < self.noise_eps < 1.0:
            raise ValueError(f"loglinear noise needs 0 < noise_eps < 1, got {self.noise_eps}")
        if self.noise == "geometric" and not 0.0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"geometric noise needs 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")

    def noise_kwargs(self) -> dict[str, float]:
        """Keyword arguments of `sedd_scale.diffusion.noise.get_noise(self.noise, ...)`."""
        if self.noise == "loglinear":
            return {"eps": self.noise_eps}
        return {"sigma_min": self.sigma_min, "sigma_max": self.sigma_max}

    def noise_spec(self) -> dict[str, Any]:
        """The schedule as checkpoints record it: {"type": self.noise, **noise_kwargs()}."""
        return {"type": self.noise, **self.noise_kwargs()}

    @staticmethod
    def section_for(spec: dict[str, Any]) -> dict[str, Any]:
        """The recipe's `diffusion` keys that select the schedule `spec` (a `noise_spec()`)."""
        if spec["type"] == "loglinear":
            return {"noise": "loglinear", "noise_eps": spec["eps"]}
        return {"noise": spec["type"], "sigma_min": spec["sigma_min"], "sigma_max": spec["sigma_max"]}


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
    seq_len: int = 1024
    num_workers: int = 2
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

    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup: int = 2500
    schedule: Literal["constant", "cosine"] = "constant"
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
        """Learning rate for optimizer step `step` (0-based) of `total_steps`: the reference's lr*min(step/warmup, 1)."""
        if self.warmup and step < self.warmup:
            return self.lr * step / self.warmup
        if self.schedule == "constant":
            return self.lr
        progress = min(1.0, (step - self.warmup) / max(1, total_steps - self.warmup))
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))


@dataclass
class ParallelConfig:
    """Tensor x pipeline x data parallelism (DP is what the world size leaves), ZeRO, batch sizes."""

    tp: int = 1
    pp: int = 1
    zero_stage: int = 1
    micro_batch: int = 1  # sequences per rank per forward
    global_batch: int = 512  # sequences per optimizer step over all data-parallel ranks

    def __post_init__(self):
        if self.tp < 1 or self.pp < 1:
            raise ValueError(f"tp and pp must be >= 1, got tp={self.tp}, pp={self.pp}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        _check_zero_with_pipeline(self.zero_stage, self.pp)
        if self.micro_batch < 1 or self.global_batch < 1:
            raise ValueError(f"micro_batch and global_batch must be >= 1, got {self.micro_batch}, {self.global_batch}")


@dataclass
class TrainConfig:
    """The training loop: length, EMA, seeds, intervals and safety limits."""

    steps: int = 1000  # optimizer steps (precision and activation checkpointing are model settings)
    ema: float = 0.9999  # decay, warmed up as min(ema, (1+n)/(10+n)) like the reference
    seed: int = 0
    log_every: int = 50
    eval_every: int = 100
    save_every: int = 1000
    keep_last: int = 3  # checkpoints kept on disk
    max_nonfinite_steps: int = 10  # consecutive skipped steps (non-finite loss/grad) before stopping
    peak_tflops: float | None = None  # per-device peak for MFU (e.g. 989 for H100 bf16 dense); None: no MFU
    eval_batches: int = 4  # validation micro-batches per rank for the ELBO at each evaluation
    eval_draws: int = 4  # Monte-Carlo t draws per validation sequence (stratified)
    sample_steps: int = 64  # sampler steps of the example texts written at each evaluation
    # Periodic checkpoints are copied to host memory and written by a background thread while
    # training continues (the pre-emption checkpoint is always written synchronously).
    async_save: bool = True

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"ema must be in [0, 1), got {self.ema}")
        for name in ("log_every", "eval_every", "save_every", "keep_last", "max_nonfinite_steps", "eval_batches",
                     "sample_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_draws < 2:
            raise ValueError(f"eval_draws must be >= 2 (a standard error needs two draws), got {self.eval_draws}")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ValueError(f"peak_tflops must be > 0 (or null), got {self.peak_tflops}")


@dataclass
class CheckpointConfig:
    """Where the run writes checkpoints (and logs), and whether it resumes from them."""

    dir: str = "runs/default"
    resume: bool = True  # continue from the latest checkpoint in `dir` when there is one
    # With resume false, a directory that already holds checkpoints is refused unless this is true:
    # then its checkpoints are deleted and its logs restart at step 0.
    start_over: bool = False

    def __post_init__(self):
        if self.start_over and self.resume:
            raise ValueError("start_over=true discards the run's checkpoints: it needs resume=false")


@dataclass(frozen=True)
class Layout:
    """A resolved parallel layout: world = tp * pp * dp; global batch = micro * dp * grad_accum."""

    world_size: int
    tp: int
    pp: int
    dp: int
    zero_stage: int
    micro_batch: int
    global_batch: int
    grad_accum: int

    def __post_init__(self):
        if self.tp * self.pp * self.dp != self.world_size:
            raise ValueError(f"tp*pp*dp = {self.tp}*{self.pp}*{self.dp} != world size {self.world_size}")
        if self.micro_batch * self.dp * self.grad_accum != self.global_batch:
            raise ValueError(f"micro*dp*grad_accum = {self.micro_batch}*{self.dp}*{self.grad_accum} "
                             f"!= global batch {self.global_batch}")
        _check_zero_with_pipeline(self.zero_stage, self.pp)

    def describe(self) -> str:
        """One line for logs and the launcher."""
        return (f"world {self.world_size} = TP {self.tp} x PP {self.pp} x DP {self.dp} | ZeRO-{self.zero_stage} | "
                f"batch {self.global_batch} = micro {self.micro_batch} x DP {self.dp} x grad accum {self.grad_accum}")


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
                             f"choose pp among {_divisors(m.n_blocks)}")
        if m.precision == "bf16" and self.parallel.zero_stage == 0:
            # Without ZeRO DeepSpeed wraps bf16 weights in another optimizer, whose state nothing here reads.
            raise ValueError("model.precision=bf16 keeps fp32 master weights in DeepSpeed's bf16 optimizer, which "
                             "runs under ZeRO: set parallel.zero_stage: 1 (it costs nothing on one GPU)")
        if m.length != self.data.seq_len:
            raise ValueError(f"model.length={m.length} differs from data.seq_len={self.data.seq_len}: set both "
                             "to the sequence length the data was prepared with")
        vocab = tokenizer_vocab_size(self.data.tokenizer) if self.data.tokenizer else m.num_tokens
        if m.num_tokens != vocab:
            raise ValueError(f"model.num_tokens={m.num_tokens} does not match data.tokenizer "
                             f"'{self.data.tokenizer}' ({vocab} tokens): set model.num_tokens: {vocab}")

    def layout(self, world_size: int) -> Layout:
        """Resolve DP and gradient accumulation for `world_size` ranks; RecipeError if impossible."""
        p = self.parallel
        if world_size < 1 or world_size % (p.tp * p.pp):
            raise RecipeError(f"world size {world_size} is not divisible by tp*pp = {p.tp}*{p.pp} = {p.tp * p.pp}: "
                              f"launch a multiple of {p.tp * p.pp} processes or change parallel.tp/pp")
        dp = world_size // (p.tp * p.pp)
        if p.global_batch % (p.micro_batch * dp):
            raise RecipeError(f"parallel.global_batch={p.global_batch} is not divisible by micro_batch*dp = "
                              f"{p.micro_batch}*{dp} = {p.micro_batch * dp}: change global_batch or micro_batch")
        return Layout(world_size, p.tp, p.pp, dp, p.zero_stage, p.micro_batch, p.global_batch,
                      p.global_batch // (p.micro_batch * dp))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read a recipe YAML file, apply `key.path=value` overrides, validate, return the Recipe."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {str(path)!r} not found (recipes live in recipes/*.yaml)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): save the recipe as UTF-8") from None
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


def main(argv: list[str] | None = None) -> int:
    """Validate a recipe and print its resolved layout for a world size with the layout planner's memory,
    bubble, time and MFU estimates (the launcher's pre-flight check); --propose lists the layouts that fit."""
    from sedd_scale import planner  # here: the planner reads recipes (config must not import it at load)

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_recipe_args(parser)
    parser.add_argument("--world-size", type=int, default=1)
    parser.add_argument("--gpu", choices=sorted(planner.GPUS), default=None,
                        help=f"GPU to plan for (default {planner.DEFAULT_GPU}, with train.peak_tflops for MFU if set)")
    parser.add_argument("--propose", action="store_true",
                        help="also list the layouts that fit this world size, fastest first")
    parser.add_argument("--efficiency", type=float, default=planner.Assumptions.efficiency,
                        help="fraction of the peak FLOP rate the matmuls sustain (default %(default)s)")
    parser.add_argument("--print-recipe", action="store_true", help="also print the resolved recipe as YAML")
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, overrides_from_args(args))
        assumptions = planner.Assumptions(efficiency=args.efficiency)
    except (RecipeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    gpu = planner.GPUS[args.gpu or planner.DEFAULT_GPU]
    peak = None if args.gpu else recipe.train.peak_tflops  # an explicit --gpu brings its own peak
    code = 0
    try:
        layout = recipe.layout(args.world_size)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        if not args.propose:
            return 2
        code = 2
    else:
        print(f"layout: {layout.describe()}")
        plan = planner.plan(recipe, planner.candidate_of(recipe, layout), gpu, assumptions, peak)
        print(planner.format_plan(recipe, plan))
    if args.propose:
        print(planner.format_proposals(recipe, args.world_size,
                                       planner.propose(recipe, args.world_size, gpu, assumptions, peak)))
    if args.print_recipe:
        print("---")
        print(yaml.safe_dump(to_dict(recipe), sort_keys=False), end="")
    return code


if __name__ == "__main__":
    sys.exit(main())
