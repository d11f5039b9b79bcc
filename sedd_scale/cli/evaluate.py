"""Distributed ELBO evaluation: nats/token, the perplexity upper bound, its standard error, token count.

    python tools/evaluate.py runs/cpu-tiny --split test                       # one process
    torchrun --nproc-per-node 8 tools/evaluate.py runs/x --split test --draws 16 --out x-test.json
    python tools/evaluate.py hub-or-consolidated-dir --datasets ptb          # the paper's zero-shot PTB
    python tools/evaluate.py DIR --datasets all --lambada-file lambada_test.jsonl \
        --wikitext2-file wikitext-2-raw/wiki.train.raw --wikitext103-file wikitext-103-raw/wiki.test.raw \
        --1bw-file 'heldout-monolingual.tokenized.shuffled/news.en.heldout-*' --out table1.json

CHECKPOINT is a training checkpoint (run dir or step folder; evaluated in its own layout, so launch
as many ranks as it was trained with), or a consolidated / hub directory (TP and PP from --tp/--pp,
default 1 as in tools/sample.py; DP = the remaining ranks), which needs nothing beside it: its tokenizer is
the one bundled in it, and its data the recipe's only when given again (--manifest) or found where the
recipe says. Data-parallel ranks split the batches; each
batch's noise comes from (seed, batch index), so any DP size gives the same result. Every sequence
gets --draws t over the whole noise range, plus the prior term: the draws form R independent
replicates (R = the smallest factor >= 2 of --draws: 2 for an even count), each a stratified design
(antithetic pairs by default). Two errors are reported: `stderr`, the Monte-Carlo error (what another
--seed changes; from the replicates' spread), and `data_stderr`, the error over the choice of
sequences (what another test set of as many sequences from the same source changes, its noise
included; from the spread over batches, null with a single batch). An empty split is refused.
A prompt/response (SFT) manifest is evaluated conditionally: prompts held clean, the bound on each
response given its prompt, `tokens` and nats_per_token counting response tokens only.

--datasets lambada,wikitext2,ptb,wikitext103,1bw (or all): the SEDD paper's zero-shot protocol (Table 1)
for each named set: its files read in their distribution format and detokenized like the reference
(sedd_scale/data/eval_sets.py), GPT-2 tokens with EOS after each document (byte tokens for a
257-token model), concatenated and cut into blocks of the model's length (no sliding window, the
final remainder dropped), each set prepared once into $SEDD_CACHE (keyed by the files' sha256).
Files: --lambada-file (lambada_test.jsonl), --wikitext2-file / --wikitext103-file (wiki.*.raw),
--1bw-file (heldout files, globs and folders allowed), --ptb-file (ptb.test.txt; default: the PTB
test split from its pinned PyPI package); --data-file PATH stands for the flag when one set is
named. A requested set without its file, or a file out of format (the error names the file, line
and format), exits with 2 before any work. One JSON (--out) and one table hold every set, each
with the bound, `stderr` and `data_stderr`. --protocol ptb is the same as --datasets ptb.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from itertools import islice
from pathlib import Path

# torch, megatron and the checkpoint code are imported where used, so a wrong flag is answered at once.


class EvaluationError(ValueError):
    """A request that cannot be evaluated as asked."""


# The sets' flags, mirrored from sedd_scale/data/eval_sets.py so that the command line parses without importing
# the package (tests/test_evaluate_tool.py checks that they agree).
EVAL_SET_FLAGS = {
    "lambada": ("--lambada-file", "OpenAI's lambada_test.jsonl (a JSON object with \"text\" per line)"),
    "wikitext2": ("--wikitext2-file", "WikiText-2 raw text, wiki.{train,valid,test}.raw (the paper: train)"),
    "ptb": ("--ptb-file", "ptb.test.txt, one sentence per line (default: the pinned PyPI package's test split)"),
    "wikitext103": ("--wikitext103-file", "WikiText-103 raw text, wiki.test.raw"),
    "1bw": ("--1bw-file", "One Billion Word heldout files news.en.heldout-*-of-00050 (paths, folders, globs)"),
}
EVAL_SET_NAMES = tuple(EVAL_SET_FLAGS)


def _dest(name: str) -> str:
    return "lm1b" if name == "1bw" else name  # argparse dests are identifiers


def parser() -> argparse.ArgumentParser:
    """The command line."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--manifest", default=None, help="data manifest.json (default: the recipe's validation data)")
    ap.add_argument("--split", default=None, help="split to evaluate (default: test when present, else valid)")
    ap.add_argument("--datasets", default=None,
                    help="zero-shot sets to evaluate: all, or a comma list of " + ", ".join(EVAL_SET_NAMES))
    ap.add_argument("--protocol", choices=("ptb",), default=None, help="the same as --datasets ptb")
    for name, (flag, what) in EVAL_SET_FLAGS.items():
        ap.add_argument(flag, dest=f"{_dest(name)}_file", nargs="+", default=None, metavar="PATH",
                        help=f"{name}: {what}")
    ap.add_argument("--data-file", nargs="+", default=None, metavar="PATH",
                    help="the file(s) of the one set named by --datasets (instead of its own flag)")
    ap.add_argument("--draws", type=int, default=8,
                    help="Monte-Carlo t draws per sequence, split into independent replicates (8 = 2 x 4)")
    ap.add_argument("--no-antithetic", dest="antithetic", action="store_false", help="independent draws per stratum")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=None,
                    help="sequences per rank per forward (default: the recipe's micro-batch)")
    ap.add_argument("--max-batches", type=int, default=None, help="evaluate only the first N batches per rank")
    ap.add_argument("--weights", choices=("ema", "raw"), default="ema",
                    help="training checkpoints: EMA or raw weights (other formats hold one set)")
    ap.add_argument("--tp", type=int, default=None, help="consolidated/hub: tensor-parallel size")
    ap.add_argument("--pp", type=int, default=None, help="consolidated/hub: pipeline stages")
    ap.add_argument("--out", default=None, help="results JSON (written atomically by rank 0)")
    ap.add_argument("--tensorboard", default=None, help="tensorboard log dir for the results")
    return ap


def requested_sets(args) -> dict[str, list[Path] | None]:
    """Set name -> its files (None: PTB's built-in test split), checked against the flags; EvaluationError for a
    set without its file, a file flag for a set not requested, or a file out of format (read once here)."""
    from sedd_scale.data.corpora import expand_inputs
    from sedd_scale.data.eval_sets import EVAL_SETS, FormatError, parse_datasets

    spec = args.datasets or args.protocol
    given = {name: getattr(args, f"{_dest(name)}_file") for name in EVAL_SET_NAMES}
    if spec is None:
        extra = [EVAL_SET_FLAGS[n][0] for n, v in given.items() if v] + (["--data-file"] if args.data_file else [])
        if extra:
            raise EvaluationError(f"{', '.join(extra)} name dataset files: pass --datasets too (e.g. --datasets all)")
        return {}
    if args.manifest or args.split:
        raise EvaluationError("--datasets evaluates the named sets' test files: drop --manifest/--split")
    try:
        names = parse_datasets(spec)
    except ValueError as e:
        raise EvaluationError(f"--datasets: {e}") from None
    if args.data_file:
        if len(names) != 1:
            raise EvaluationError(f"--data-file stands for one set's flag, but --datasets names {len(names)}: "
                                  "pass each set's own flag (" + ", ".join(EVAL_SET_FLAGS[n][0] for n in names) + ")")
        if given[names[0]]:
            raise EvaluationError(f"both --data-file and {EVAL_SET_FLAGS[names[0]][0]} name {names[0]}'s file: "
                                  "pass one")
        given[names[0]] = args.data_file
    stray = [EVAL_SET_FLAGS[n][0] for n, v in given.items() if v and n not in names]
    if stray:
        raise EvaluationError(f"{', '.join(stray)} given but not requested: add the set to --datasets or drop the "
                              "flag")
    out: dict[str, list[Path] | None] = {}
    for name in names:
        eval_set, flag = EVAL_SETS[name], EVAL_SET_FLAGS[name][0]
        if not given[name]:
            if not eval_set.builtin:
                raise EvaluationError(f"--datasets {name} needs its file: pass {flag} PATH ({eval_set.expected})")
            out[name] = None
            continue
        try:
            paths = expand_inputs(given[name])
            for _ in eval_set.documents(paths):  # the whole file, so a bad line fails before any work
                pass
        except (FormatError, ValueError, FileNotFoundError) as e:
            raise EvaluationError(f"{flag}: {e}") from None
        out[name] = paths
    return out


def _eval_set_manifest(name: str, paths: list[Path] | None, length: int, num_tokens: int,
                       tokenizer: str | None) -> Path:
    """The test blocks of set `name` for a model of `length` tokens under its `tokenizer` (a spec; None: the one its
    vocabulary implies), prepared once: rank 0 prepares, the others wait."""
    import hashlib

    import torch.distributed as dist

    from sedd_scale.checkpoint.bundle import TOKENIZER_BY_VOCAB
    from sedd_scale.data.fetch import cache_dir
    from sedd_scale.data.tokenizer import tokenizer_identity

    tokenizer = tokenizer or TOKENIZER_BY_VOCAB.get(num_tokens)
    if tokenizer is None:
        raise EvaluationError(f"--datasets needs the model's tokenizer: this model of {num_tokens} tokens has none "
                              "bundled (tokenizer_config.json) and its vocabulary implies none (GPT-2: 50257, bytes: "
                              "257); export it again with tools/convert_checkpoint.py from its training run")
    label, sha = tokenizer_identity(tokenizer)
    key = f"{name}-{label}-{(sha or '')[:12]}-{length}"
    if paths is not None:  # the files' contents name the cache entry: another file is prepared anew
        digest = hashlib.sha256(EVAL_PROTOCOL.encode())
        for path in paths:
            digest.update(hashlib.sha256(path.read_bytes()).digest())
        key += "-" + digest.hexdigest()[:16]
    out = cache_dir() / "eval" / key
    if dist.get_rank() == 0 and not _readable_manifest(out / "manifest.json"):
        import shutil

        from sedd_scale.data.eval_sets import prepare_eval_set

        if out.exists():  # our own cache, written by an older data format: rebuilt, not misread
            print(f"[evaluate] rebuilding the {name} cache {out} (written in an older data format)", file=sys.stderr)
            shutil.rmtree(out)
        prepare_eval_set(name, paths, tokenizer=tokenizer, seq_len=length, out=out, protocol=EVAL_PROTOCOL)
    dist.barrier()
    return out / "manifest.json"


def _check_sets_hold_a_block(targets: dict, length: int) -> None:
    """EvaluationError naming every set whose files fill no block of the model's length (nothing to evaluate)."""
    from sedd_scale.data.manifest import Manifest

    short = {name: Manifest.load(manifest).splits[split] for name, (manifest, split) in targets.items()}
    short = {name: info for name, info in short.items() if info.num_sequences == 0}
    if short:
        what = ", ".join(f"{name} ({info.dropped_tokens} tokens)" for name, info in short.items())
        raise EvaluationError(f"fewer tokens than one block of the model's length {length} in {what}: nothing to "
                              "evaluate; pass the whole test file")


EVAL_PROTOCOL = "SEDD zero-shot: reference detokenizer, EOS after each document, concatenated, blocks"


def _readable_manifest(path: Path) -> bool:
    """Whether `path` is a manifest this code reads (False: missing, or another format version)."""
    from sedd_scale.data.manifest import Manifest, ManifestError

    if not path.is_file():
        return False
    try:
        Manifest.load(path)
    except ManifestError:
        return False
    return True


def _choose_split(manifest: str, requested: str | None) -> str:
    """The split to evaluate (default: test when present, else valid); a missing or empty one is refused."""
    from sedd_scale.data.manifest import Manifest

    splits = Manifest.load(manifest).splits
    split = requested or ("test" if "test" in splits else "valid")
    if split not in splits or splits[split].num_sequences == 0:
        have = ", ".join(f"{name} ({info.num_sequences} sequences)" for name, info in splits.items())
        state = "has no" if split not in splits else "holds no sequences in its"
        raise EvaluationError(f"{manifest} {state} split {split!r}: nothing to evaluate; pass --split with a "
                              f"non-empty one ({have}) or another --manifest")
    return split


def _recipe_for_weights(weights, folder: Path, manifest: str | None, *, tp: int, pp: int, micro_batch: int,
                        dp: int) -> dict:
    """A recipe (as data) to run weights-only `weights` (from `folder`) under TP x PP x DP: the saved one when there
    is one, with the directory's own tokenizer and `manifest` (when given) for the data."""
    from sedd_scale.checkpoint.bundle import tokenizer_spec
    from sedd_scale.config import DiffusionConfig, to_dict
    from sedd_scale.data.tokenizer import is_tokenizer_file

    model = to_dict(weights.config)
    data = copy.deepcopy(weights.recipe) if weights.recipe else {
        "model": model, "data": {"manifests": [manifest or "unused"], "tokenizer": None, "seq_len": model["length"]}}
    bundled = tokenizer_spec(folder)  # the bundled tokenizer, not the recipe's path (relative to its run)
    saved = data["data"].get("tokenizer")
    if bundled is not None:
        data["data"]["tokenizer"] = bundled
    elif saved and is_tokenizer_file(saved) and not Path(saved).is_file():
        data["data"]["tokenizer"] = None  # an export from before tokenizers were bundled: check by vocabulary only
    if manifest:
        data["data"] = {**data["data"], "manifests": [manifest], "valid": manifest, "weights": None}
    data["diffusion"] = {**data.get("diffusion", {}), **DiffusionConfig.section_for(weights.noise)}
    if weights.config.parametrization == "denoiser":  # a hub export has no recipe: its ELBO is masked_ce's loss
        data["diffusion"].setdefault("objective", "masked_ce")
    data["parallel"] = {"tp": tp, "pp": pp, "zero_stage": 0, "micro_batch": micro_batch,
                        "global_batch": micro_batch * dp}
    data["checkpoint"] = {"dir": os.devnull, "resume": False}
    return data


def training_step(path: Path) -> Path | None:
    """The step folder of a training checkpoint (run directory or step folder), or None for a consolidated or hub
    directory; EvaluationError for anything else. Cheap: called before any process group."""
    from sedd_scale.apps import convert
    from sedd_scale.checkpoint import consolidated as cons
    from sedd_scale.checkpoint import hub

    if not path.exists():
        raise EvaluationError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        raise EvaluationError(f"checkpoint {path} is a file: pass a checkpoint directory")
    if cons.is_consolidated(path) or (path / hub.CONFIG_FILE).is_file():
        return None
    try:
        return convert.find_step(path)
    except convert.ConversionError as e:
        raise EvaluationError(f"{e}: pass a training checkpoint (run directory or step_* folder), or a consolidated "
                              "or hub directory (config.json + model.safetensors)") from None


def build(args, world: int, step: Path | None):
    """The trainer holding the checkpoint's weights under the evaluation layout, the recipe, and the optimizer steps
    the weights were trained for (None when unknown; `step`: the training checkpoint's step folder, None for a
    consolidated or hub directory)."""
    from sedd_scale.apps import convert
    from sedd_scale.checkpoint import full_state
    from sedd_scale.checkpoint.sharded import ANY_LAYOUT, read_meta
    from sedd_scale.pretrained import read_weights

    path = Path(args.checkpoint)
    if step is None:
        weights = read_weights(path)
        trained = (weights.recipe or {}).get("parallel", {})
        tp, pp = args.tp or 1, args.pp or 1  # the weights run under any layout; TP 1 unless asked, as sample.py
        if world % (tp * pp):
            raise EvaluationError(f"{world} ranks cannot hold TP {tp} x PP {pp}: launch a multiple of {tp * pp}")
        recipe = _recipe_for_weights(weights, path, args.manifest, tp=tp, pp=pp, dp=world // (tp * pp),
                                     micro_batch=args.batch_size or trained.get("micro_batch", 8))
        trainer = convert.build_trainer(recipe)
        full_state.load(trainer, {"weights": weights.tensors}, None)  # the EMA starts as these weights
        return trainer, recipe, weights.step
    meta = read_meta(step)
    if meta["layout"] != ANY_LAYOUT and meta["world_size"] != world:  # a resharded (layout-free) step runs anywhere
        raise EvaluationError(f"{step} was written by {meta['world_size']} ranks and is evaluated in its own layout: "
                              f"launch {meta['world_size']} ranks, or consolidate it first "
                              "(tools/convert_checkpoint.py consolidate) to evaluate under any layout")
    if args.tp or args.pp:
        raise EvaluationError("--tp/--pp apply to consolidated and hub checkpoints; a training checkpoint runs "
                              "in its trained layout")
    recipe = {**meta["recipe"], "checkpoint": {"dir": str(step.parent), "resume": False}}
    trainer = convert.build_trainer(recipe)
    trainer.load(step)
    return trainer, recipe, trainer.step


def run(args) -> dict | None:
    """Evaluate on every rank; rank 0 returns (and writes) the results."""
    from sedd_scale.diffusion.elbo import replicate_split

    if args.draws < 2:
        raise EvaluationError(f"--draws must be >= 2 (a standard error needs two), got {args.draws}")
    replicates, _ = replicate_split(args.draws)
    if args.max_batches is not None and args.max_batches < 1:
        raise EvaluationError(f"--max-batches must be >= 1, got {args.max_batches}")
    if args.out and Path(args.out).exists():
        raise EvaluationError(f"{args.out} exists: choose another --out (results are never overwritten)")
    sets = requested_sets(args)  # a missing or malformed dataset file fails before any process group or model
    if args.manifest and not sets:
        _choose_split(args.manifest, args.split)  # so does an empty split
    step = training_step(Path(args.checkpoint))  # and a folder that is no checkpoint

    import sedd_scale.compat  # noqa: F401  (before megatron-core / DeepSpeed)

    import torch.distributed as dist

    from sedd_scale.distributed import engine
    from sedd_scale.train.metrics import Metrics

    started = time.perf_counter()
    engine.init_world()
    trainer, recipe, trained_steps = build(args, dist.get_world_size(), step)
    cfg = trainer.model_cfg
    if sets:
        targets = {name: (str(_eval_set_manifest(name, paths, cfg.length, cfg.num_tokens,
                                                 recipe["data"].get("tokenizer"))), "test")
                   for name, paths in sets.items()}
        _check_sets_hold_a_block(targets, cfg.length)
    else:
        data = recipe["data"]
        manifest = args.manifest or data.get("valid") or data["manifests"][0]
        if not Path(manifest).is_file() and "://" not in manifest:
            raise EvaluationError(f"the model's recipe evaluates {manifest}, which is not found from {Path.cwd()} "
                                  "(a recipe's paths are relative to where it trained): pass --manifest PATH, or "
                                  "--datasets for the zero-shot sets")
        targets = {None: (manifest, _choose_split(manifest, args.split))}
    rank0 = dist.get_rank() == 0
    # (with --tensorboard the progress bar is the metrics' own; its total is unknown before the loaders exist)
    metrics = Metrics(args.tensorboard or os.devnull, total_steps=0, enabled=rank0 and bool(args.tensorboard))
    results = {name: _evaluate_one(args, trainer, manifest, split, metrics, rank0, prefix=name or split)
               for name, (manifest, split) in targets.items()}
    metrics.close()
    common = {"checkpoint": str(args.checkpoint), "step": trained_steps, "weights": args.weights, "draws": args.draws,
              "replicates": replicates, "antithetic": args.antithetic, "seed": args.seed,
              "layout": trainer.layout.describe(), "seconds": round(time.perf_counter() - started, 1)}
    if sets:
        result = {**common, "protocol": EVAL_PROTOCOL,
                  "files": {n: [str(p) for p in ps] if ps else "built-in" for n, ps in sets.items()},
                  "datasets": results}
    else:
        result = {**common, **results[None]}
    if rank0 and args.out:
        from sedd_scale.checkpoint.sharded import atomic_write_text

        atomic_write_text(Path(args.out), json.dumps(result, indent=2))
    return result if rank0 else None


def _evaluate_one(args, trainer, manifest: str, split: str, metrics, rank0: bool, prefix: str) -> dict:
    """The bound over one split of one manifest: nats/token, both errors, counts (logged under eval/PREFIX/)."""
    import sedd_scale.compat  # noqa: F401  (before megatron-core)

    from megatron.core import parallel_state as ps

    from sedd_scale.data.loader import EvalLoader
    from sedd_scale.data.manifest import Manifest

    cfg, layout = trainer.model_cfg, trainer.layout
    loader = EvalLoader(manifest, split, args.batch_size or layout.micro_batch, ps.get_data_parallel_rank(),
                        layout.dp)
    loader.check_compatible(cfg.num_tokens, cfg.length)
    batches = len(loader) if args.max_batches is None else min(len(loader), args.max_batches)
    bar = None
    if rank0 and not args.tensorboard:
        from tqdm import tqdm

        bar = tqdm(total=batches, unit="batch", dynamic_ncols=True, mininterval=1.0, desc=prefix)
    estimate = trainer.validate(islice(loader, batches), args.draws, antithetic=args.antithetic, seed=args.seed,
                                ema=args.weights == "ema", progress=bar.update if bar else metrics.advance)
    if bar:
        bar.close()
    data_stderr = estimate.data_stderr if math.isfinite(estimate.data_stderr) else None  # null: a single batch
    scalars = {f"eval/{prefix}/elbo_nats_per_token": estimate.nats_per_token,
               f"eval/{prefix}/elbo_stderr": estimate.stderr,
               f"eval/{prefix}/perplexity_bound": estimate.perplexity_bound}
    if data_stderr is not None:
        scalars[f"eval/{prefix}/elbo_data_stderr"] = data_stderr
    metrics.scalars(trainer.step, scalars)
    result = {"manifest": manifest, "split": split, "nats_per_token": estimate.nats_per_token,
              "stderr": estimate.stderr, "data_stderr": data_stderr, "perplexity_bound": estimate.perplexity_bound,
              "tokens": estimate.num_tokens, "sequences": estimate.num_sequences, "batches": len(estimate.groups),
              "dropped_tokens": Manifest.load(manifest).splits[split].dropped_tokens}
    if loader.conditional:  # the bound on the responses given their prompts: tokens and nats count responses only
        result["scored"] = "response tokens (prompts held clean): nats_per_token is per response token"
    return result


TABLE_COLUMNS = ("nats_per_token", "stderr", "data_stderr", "perplexity_bound", "tokens", "sequences")


def format_table(result: dict) -> str:
    """The printed result: key/value lines, then one row per dataset when --datasets was given."""
    scalars = {k: v for k, v in result.items() if k not in ("datasets", "files")}
    width = max(len(k) for k in scalars)
    lines = [f"{k:<{width}}  {v}" for k, v in scalars.items()]
    if "datasets" in result:
        rows = [("dataset", *TABLE_COLUMNS)]
        for name, r in result["datasets"].items():
            rows.append((name, *(("-" if r[c] is None else f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]))
                                 for c in TABLE_COLUMNS)))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines += [""] + ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                                   enumerate(zip(row, widths))) for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse, evaluate, print the table on rank 0; bad input exits with 2 and the reason."""
    args = parser().parse_args(argv)
    import torch.distributed as dist

    from sedd_scale.checkpoint.consolidated import ConsolidatedError
    from sedd_scale.checkpoint.hub import HubFormatError
    from sedd_scale.checkpoint.sharded import CheckpointError
    from sedd_scale.config import RecipeError
    from sedd_scale.data.manifest import ManifestError
    from sedd_scale.data.shards import ShardError
    from sedd_scale.data.urlcache import UrlError

    try:
        result = run(args)
    except (EvaluationError, ConsolidatedError, HubFormatError, CheckpointError, RecipeError, ManifestError,
            ShardError, UrlError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result is not None:
        print(format_table(result), flush=True)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
