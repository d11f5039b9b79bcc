"""Sample a trained SEDD model (unconditional, prefix/suffix, or templates with blanks) and report metrics.

    python tools/sample.py CKPT [--out samples.jsonl] [--num-samples 8] [--batch-size 8] [--steps 1024]
        [--predictor analytic|euler] [--sampler NAME[:key=value,...]] [--sampler-option KEY=VALUE ...]
        [--length L] [--seed 0] [--tp 1] [--tokenizer auto|gpt2|byte|none|PATH.json]
        [--prefix TEXT] [--suffix TEXT] | [--template "The [BLANK] sat on the [BLANK:3]." --blank-len 8]
        [--gen-ppl-model HF_DIR [--gen-ppl-tokens auto|ids|text] [--gen-ppl-batch-size N]]
        [--eps 1e-5] [--no-denoise] [--precision fp32|bf16|bf16-mixed] [--summary PATH] [--overwrite]
        [--extrapolate] [--show N]
    torchrun --nproc-per-node 8 tools/sample.py CKPT --tp 2 --out samples.jsonl ...

CKPT is any directory `sedd_scale.pretrained.load_pretrained` accepts; the weights it holds (EMA or
raw) are the ones sampled. With W processes and --tp T, DP = W / T replicas each draw their share
of the batches: batch b (global index) uses a generator seeded from (--seed, b) and goes to DP rank
b mod DP, so the samples do not depend on the number of processes. Rank 0 prints the samples (text,
or ids without a tokenizer; all of them without --out, the first --show with it) and a table. With
--out it writes the JSONL (one line per sample: index, ids, text, conditioning, unigram_entropy,
gen_ppl) and a JSON summary next to it (`<out minus .jsonl>.summary.json`, or --summary), both
atomically; without --out nothing is written but a --summary asked for.

Samplers (`--sampler`, sedd_scale/diffusion/samplers/; --steps is each one's budget): analytic (default)
and euler are the exact tau-leaping samplers (steps + 1 network evaluations); cached reuses the network
for sequences that did not change (`predictor=`; exact for a sigma-independent model, see cached.py);
confidence unmasks the most confident positions (`threshold=`, `top_k=`; NFE <= steps; absorbing graph);
block decodes blocks of `size=` left to right with `inner=` any other sampler (its options pass through).
Options go after a colon or in --sampler-option, e.g. `--sampler block:size=64,inner=confidence
--sampler-option threshold=0.9`. --predictor without --sampler picks analytic or euler; with --sampler it
is that sampler's `predictor` option. The summary records the sampler's spec and its NFE (network
evaluations per sequence).

Templates: `[BLANK]` is a blank of --blank-len tokens, `[BLANK:N]` one of N tokens; the text
between is tokenised piece by piece as written (GPT-2 BPE: a space before a blank is its own token,
so write "The[BLANK] sat" to let the blank begin with " cat"). Without --length a template sets the
length; with a longer --length the positions after it are generated too.

Length: samples are at most the model's training length (config.json's length). A longer --length
or template is refused unless --extrapolate: rotary attention runs at any length, but the model
never saw such lengths, so quality is unknown; a warning is printed and the summary records
"extrapolated": true.

Metrics, both over whole samples (given tokens included): unigram entropy = entropy (nats) of each
sample's empirical token distribution, -sum_v p_v ln p_v with p_v = count(v) / length, averaged over
samples. Generative perplexity (--gen-ppl-model, a local Hugging Face causal LM; nothing is
downloaded): the reference's mean over samples of exp(mean next-token NLL), and the token-weighted
exp(total NLL / total tokens). GPT-2-vocabulary samples are scored as ids, as the reference does;
otherwise the text is re-tokenised with the scorer's tokenizer (see CausalLMScorer).

Bad input (missing checkpoint, too long a prefix/suffix/template, a length past the training length
without --extrapolate, --tp not dividing the world size or the heads, an existing --out without
--overwrite) exits with code 2 before any work; existing files are left as they are. The command line
is parsed before torch and the model code are imported, so a wrong flag is answered at once.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch and the model code are imported only once the command line parses
    import torch

    from sedd_scale.apps.generation import CausalLMScorer, Conditioning
    from sedd_scale.model.config import ModelConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint directory: hub (config.json + model.safetensors) or consolidated")
    p.add_argument("--out", help="JSONL file of samples (rank 0 writes it; default: print them, write nothing)")
    p.add_argument("--summary", help="JSON summary file (default: <out without .jsonl>.summary.json with --out, "
                                     "else none)")
    p.add_argument("--overwrite", action="store_true", help="replace existing --out / --summary files")
    p.add_argument("--num-samples", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8, help="samples per sampler call (per DP rank)")
    p.add_argument("--steps", type=int, default=1024, help="predictor steps (the reference's default: 1024)")
    p.add_argument("--predictor", choices=("analytic", "euler"),
                   help="the exact sampler's predictor (default analytic); with --sampler, its predictor option")
    p.add_argument("--sampler", help="NAME[:key=value,...]: analytic (default), euler, cached, confidence, block "
                                     "(see above)")
    p.add_argument("--sampler-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of --sampler (repeatable), e.g. threshold=0.9")
    p.add_argument("--length", type=int, help="tokens per sample (default: the template's, else the model's)")
    p.add_argument("--extrapolate", action="store_true",
                   help="allow samples longer than the model's training length (warned: it never saw them)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (divides the world size and heads)")
    p.add_argument("--eps", type=float, default=1e-5, help="last time of the sampler's grid")
    p.add_argument("--no-denoise", action="store_true", help="skip the final denoising jump")
    p.add_argument("--precision", choices=("fp32", "bf16", "bf16-mixed"),
                   help="model numerics (default: the checkpoint loader's, fp32)")
    p.add_argument("--tokenizer", default="auto",
                   help="auto: the model directory's own (tokenizer_config.json), else gpt2 for 50257 tokens, byte "
                        "for 257, else none (ids only); or gpt2, byte, none, or the path of a tokenizer.json")
    cond = p.add_argument_group("conditioning (text; needs a tokenizer)")
    cond.add_argument("--prefix", help="text the samples start with")
    cond.add_argument("--suffix", help="text the samples end with")
    cond.add_argument("--template", help='text with blanks, e.g. "The [BLANK] sat on the [BLANK:3]."')
    cond.add_argument("--blank-len", type=int, default=8, help="tokens of a [BLANK] without :N")
    ppl = p.add_argument_group("generative perplexity")
    ppl.add_argument("--gen-ppl-model", help="local Hugging Face causal-LM directory (e.g. GPT-2 large)")
    ppl.add_argument("--gen-ppl-tokens", choices=("auto", "ids", "text"), default="auto",
                     help="score our ids directly, or re-tokenised text (auto: ids when the vocabularies match)")
    ppl.add_argument("--gen-ppl-batch-size", type=int, default=8)
    p.add_argument("--show", type=int, default=None, help="samples to print (default: 2 with --out, else all)")
    return p.parse_args(argv)


def summary_path(args: argparse.Namespace) -> Path | None:
    """Where the JSON summary goes (None: nowhere, the samples are only printed)."""
    if args.summary:
        return Path(args.summary)
    if not args.out:
        return None
    out = Path(args.out)
    return out.with_name(out.name.removesuffix(".jsonl") + ".summary.json")


class Plan:
    """Everything decided from the inputs before any process group or model exists."""

    def __init__(self, args: argparse.Namespace, meta: ModelConfig, world: int):
        from sedd_scale.apps.generation import (
            CausalLMScorer,
            GenerationError,
            build_conditioning,
            check_tp,
            choose_tokenizer,
        )

        check_tp(world, args.tp, meta.n_heads)
        if args.steps < 1:
            raise GenerationError(f"--steps must be >= 1, got {args.steps}")
        if args.seed < 0:
            raise GenerationError(f"--seed must be >= 0, got {args.seed}")
        if not 0.0 < args.eps < 1.0:
            raise GenerationError(f"--eps must be in (0, 1) (the last time of the sampler's grid), got {args.eps}")
        self.meta = meta
        self.sampler = choose_sampler(args, meta.graph)
        self.tokenizer = choose_tokenizer(args.tokenizer, meta.num_tokens, args.checkpoint)
        self.conditioning: Conditioning = build_conditioning(
            self.tokenizer, model_length=meta.length, length=args.length, prefix=args.prefix, suffix=args.suffix,
            template=args.template, blank_len=args.blank_len, extrapolate=args.extrapolate)
        self.extrapolated = self.conditioning.length > meta.length
        self.scorer: CausalLMScorer | None = None
        if args.gen_ppl_model:
            # Weights are loaded on rank 0 only (see `run`); every rank checks vocabularies and lengths here.
            self.scorer = CausalLMScorer(args.gen_ppl_model, tokenizer=self.tokenizer, num_tokens=meta.num_tokens,
                                         mode=args.gen_ppl_tokens, batch_size=args.gen_ppl_batch_size,
                                         load_weights=False)
            self.scorer.check_length(self.conditioning.length)


def choose_sampler(args: argparse.Namespace, graph: str):
    """The sampler of --sampler / --sampler-option / --predictor, checked against the model's graph."""
    from sedd_scale.apps.generation import GenerationError
    from sedd_scale.diffusion.samplers import parse_sampler

    try:
        extra = {}
        for item in args.sampler_option:
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise ValueError(f"--sampler-option {item!r} is not KEY=VALUE (e.g. threshold=0.9)")
            extra[key.strip().replace("-", "_")] = value.strip()
        if args.sampler is None:
            spec = args.predictor or "analytic"
        else:
            spec = args.sampler
            if args.predictor:
                extra.setdefault("predictor", args.predictor)
        chosen = parse_sampler(spec, extra)
        chosen.check_graph(graph)
    except ValueError as e:
        raise GenerationError(f"--sampler: {e}") from None
    return chosen


def check_files(args: argparse.Namespace) -> None:
    """Checkpoint, scorer and output paths, before anything is loaded."""
    from sedd_scale.apps.generation import GenerationError, batch_plan

    ckpt = Path(args.checkpoint)
    if not ckpt.is_dir():
        raise GenerationError(f"checkpoint directory {str(ckpt)!r} does not exist: pass the directory holding "
                              "the model (config.json + model.safetensors)")
    if args.gen_ppl_model and not (Path(args.gen_ppl_model) / "config.json").is_file():
        raise GenerationError(f"--gen-ppl-model {args.gen_ppl_model!r} is not a local Hugging Face model directory "
                              "(no config.json): pass the folder written by save_pretrained; nothing is downloaded")
    for path in (args.out and Path(args.out), summary_path(args)):
        if path and path.exists() and not args.overwrite:
            raise GenerationError(f"{str(path)!r} exists: pass --overwrite to replace it, or another --out/--summary")
    batch_plan(args.num_samples, args.batch_size)


def run(args: argparse.Namespace) -> int:
    """Check, sample, collect on rank 0, score and write; returns the exit code."""
    import torch

    from sedd_scale.apps.generation import (
        CausalLMScorer,
        GenerationError,
        batch_plan,
        check_tp,
        collect_nfe,
        collect_samples,
        generate_batches,
        model_log_score_fn,
        read_model_config,
    )

    check_files(args)
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    check_tp(world, args.tp)
    meta = read_model_config(args.checkpoint, verify=False)  # load_pretrained checks the files, on one rank
    plan = Plan(args, meta, world)
    if plan.scorer is not None and rank == 0:
        # Before any sampling: a broken scorer fails here, and a launcher then stops the other ranks.
        plan.scorer = CausalLMScorer(args.gen_ppl_model, tokenizer=plan.tokenizer, num_tokens=meta.num_tokens,
                                     mode=args.gen_ppl_tokens, batch_size=args.gen_ppl_batch_size)

    import sedd_scale.compat  # noqa: F401  (before megatron-core / DeepSpeed)

    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from sedd_scale.checkpoint.progress import bar as progress_bar
    from sedd_scale.distributed import parallel  # megatron-core from here on
    from sedd_scale.pretrained import load_pretrained

    if torch.cuda.is_available():  # before NCCL creates its communicators on the wrong device
        torch.cuda.set_device(parallel.local_device())
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    created = not dist.is_initialized()
    parallel.join_process_group()
    try:
        overrides = {"precision": args.precision} if args.precision else {}
        try:
            model, graph, noise = load_pretrained(args.checkpoint, tp_size=args.tp, device=device, **overrides)
        except (ValueError, FileNotFoundError) as e:  # a checkpoint or layout the loader refuses: bad input
            raise GenerationError(f"cannot load {args.checkpoint!r} at --tp {args.tp}: {e}") from e
        dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        cond, batches = plan.conditioning, batch_plan(args.num_samples, args.batch_size)
        if rank == 0:
            if plan.extrapolated:
                print(f"[sample] warning: {cond.length} tokens per sample, past the model's training length "
                      f"{plan.meta.length} (--extrapolate): the model never saw such lengths", file=sys.stderr,
                      flush=True)
            uniform = cond.infill is not None and plan.meta.graph == "uniform"
            note = " (uniform graph: clamping is the paper's heuristic)" if uniform else ""
            print(f"[sample] {args.num_samples} samples x {cond.length} tokens, {args.steps} steps of "
                  f"{plan.sampler.spec()}, {len(batches)} batches over DP={dp_size} x TP={args.tp}, "
                  f"{cond.info['type']}{note}", flush=True)
        started = time.perf_counter()
        # rank 0's own batches (1 in DP of them), with an ETA, on a terminal or with SEDD_PROGRESS=1
        bar = progress_bar(len(range(dp_rank, len(batches), dp_size)), "sampling", unit="batch")

        def progress(b: int, _x: torch.Tensor) -> None:
            bar.update(1)

        local_nfe: dict[int, float] = {}
        local = generate_batches(model_log_score_fn(model), graph, noise, plan=batches, length=cond.length,
                                 steps=args.steps, sampler=plan.sampler, seed=args.seed, dp_rank=dp_rank,
                                 dp_size=dp_size, infill=cond.infill, eps=args.eps, denoise=not args.no_denoise,
                                 device=device, nfe=local_nfe, on_batch=progress)
        bar.close()
        ids = collect_samples(local, len(batches), contribute=parallel.tp_rank() == 0)
        nfe = collect_nfe(local_nfe, batches, contribute=parallel.tp_rank() == 0)
        seconds = time.perf_counter() - started
        if rank == 0:
            report(args, plan, ids, nfe, seconds, world, dp_size, device)
    finally:
        if created:
            parallel.destroy_parallel()
            dist.destroy_process_group()
    return 0


def report(args, plan: Plan, ids: torch.Tensor, nfe: float, seconds: float, world: int, dp_size: int,
           device) -> None:
    """Rank 0: metrics, the JSONL and summary files, the printed samples and table."""
    from sedd_scale.apps.generation import atomic_write, sample_records, score_samples
    from sedd_scale.diffusion.sampling import unigram_entropy

    entropy = unigram_entropy(ids)
    summary = {"checkpoint": str(args.checkpoint), "out": args.out, "num_samples": int(ids.shape[0]),
               "length": int(ids.shape[1]), "steps": args.steps, "sampler": plan.sampler.spec(),
               "nfe_per_sequence": nfe,
               "sampler_exactness": plan.sampler.exactness, "predictor": getattr(plan.sampler, "predictor", None),
               "seed": args.seed,
               "batch_size": args.batch_size, "eps": args.eps, "denoise": not args.no_denoise,
               "world_size": world, "tp": args.tp, "dp": dp_size, "model_length": plan.meta.length,
               "extrapolated": plan.extrapolated,
               "tokenizer": None if plan.tokenizer is None else plan.tokenizer.name,
               "conditioning": plan.conditioning.record(), "sampling_seconds": round(seconds, 3),
               "unigram_entropy": float(entropy.mean()), "unigram_entropy_std": float(entropy.std(unbiased=False))}
    per_sample_ppl = None
    if plan.scorer is not None:
        plan.scorer.device = device
        ppl, per_sample_ppl = score_samples(plan.scorer, ids)
        summary.update(ppl)
    records = sample_records(ids, plan.conditioning, plan.tokenizer, entropy, per_sample_ppl)
    if args.out:
        atomic_write(args.out, (json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    if summary_path(args):
        atomic_write(summary_path(args), [json.dumps(summary, indent=2) + "\n"])
    show = args.show if args.show is not None else 2 if args.out else len(records)
    for rec in records[: max(show, 0)]:
        print(f"--- sample {rec['index']} ---\n{rec['text'] if 'text' in rec else json.dumps(rec['ids'])}")
    rows = [("samples", f"{summary['num_samples']} x {summary['length']} tokens"),
            ("sampler", f"{plan.sampler.spec()}, {args.steps} steps, seed {args.seed}"),
            ("network evals", f"{nfe:.2f} per sequence (NFE)"),
            ("layout", f"world {world} = DP {dp_size} x TP {args.tp}"),
            ("time", f"{seconds:.1f} s ({summary['num_samples'] * summary['length'] / max(seconds, 1e-9):.0f} tok/s)"),
            ("unigram entropy", f"{summary['unigram_entropy']:.4f} nats (mean over samples, std "
                                f"{summary['unigram_entropy_std']:.4f})")]
    if plan.scorer is not None:
        rows += [("gen ppl", f"{summary['gen_ppl']:.3f} (mean over samples of exp(mean NLL); "
                             f"{summary['gen_ppl_mode']} scoring)"),
                 ("gen ppl (tokens)", f"{summary['gen_ppl_token']:.3f} (exp(total NLL / "
                                      f"{summary['gen_ppl_scored_tokens']} tokens))")]
        if summary["gen_ppl_truncated"] or summary["gen_ppl_skipped"]:
            rows.append(("gen ppl notes", f"{summary['gen_ppl_truncated']} truncated to the scorer's context, "
                                          f"{summary['gen_ppl_skipped']} too short to score"))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    written = [str(path) for path in (args.out, summary_path(args)) if path]
    if written:
        print(f"wrote {' and '.join(written)}")


def main(argv: list[str] | None = None) -> int:
    """Entry point: exit code 0, or 2 for input that cannot work (the message says what to change)."""
    args = parse_args(argv)
    from sedd_scale.apps.generation import GenerationError  # torch loads here, once the command line parsed

    try:
        return run(args)
    except GenerationError as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
