"""The layout planner against measurements and against DeepSpeed's estimators; FLOP counts; the recipes' plans.

    python benchmarks/bench_planner.py            # every table (~8 min on 2 CPU cores)
    python benchmarks/bench_planner.py --quick    # fewer measured layouts (~2 min)

1. Memory: real training steps of a small SEDD (`sedd_scale.testing.step_memory`: the Trainer with DeepSpeed,
   megatron-core layers, the fused loss and the sharded EMA, on CPU ranks), every tensor counted by
   `LiveTensorMemory`, against `planner.stage_memory(..., Assumptions(device="cpu"))`: resident bytes
   between steps, the peak, and (PP = 1) the peak inside engine.forward / backward / step. ZeRO's reduce
   buckets are lowered to 2e6 elements for these runs (one row keeps the recipe's default: two of 2e8 with
   overlap_comm).
1b. Validation and sampling: the peak inside `Trainer.validate` and `Trainer.samples` after a training step (the
   EMA all-gathered and the weights cloned by `EMA.applied`) against the planner's validation and sampling phases.
2. Model states against DeepSpeed's estimate_zero2/3_model_states_mem_needs (16-bit weights, no offload).
3. FLOPs per token: the planner's count against torch's FlopCounterMode on a real forward + backward, and
   the old 6 x parameters convention against `flops.training_flops_per_token` (what the trainer logs MFU with).
4. The shipped multi-node recipes and the issue's layouts: memory, bubble, step time, MFU, warnings.
5. Long sequences (`--long-sequence` prints this table alone; README's numbers): recipes/sedd-7b-8k.yaml at 64 and
   1,024 GPUs with sequence parallelism, context parallelism and ZeRO's overlap_comm each turned off, everything
   else the same: the planner's memory per GPU and step time, and the command that prints each plan.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sedd_scale import plan as P
from sedd_scale.config import Recipe, from_dict, load_recipe

MiB = 2**20
BUCKET = 2_000_000
CASES_1 = {  # one rank
    # bf16 weights need ZeRO (recipes refuse bf16 at ZeRO-0: DeepSpeed's fp32 masters live in its ZeRO optimizers)
    **{f"ZeRO-{z} {prec}": ({"precision": prec}, {"zero_stage": z})
       for prec in ("fp32", "bf16") for z in (0, 1, 2, 3) if (prec, z) != ("bf16", 0)},
    "ZeRO-1 bf16-mixed recompute": ({"precision": "bf16-mixed", "activation_checkpointing": True}, {"zero_stage": 1}),
}
CASES_2 = {  # two ranks
    **{f"DP2 ZeRO-{z} {prec}": ({"precision": prec}, {"zero_stage": z})
       for prec in ("fp32", "bf16") for z in (0, 1, 2, 3) if (prec, z) != ("bf16", 0)},
    "DP2 ZeRO-1 bf16 recompute": ({"precision": "bf16", "activation_checkpointing": True}, {"zero_stage": 1}),
    "DP2 ZeRO-2 bf16-mixed": ({"precision": "bf16-mixed"}, {"zero_stage": 2}),
    "DP2 ZeRO-3 bf16-mixed recompute": ({"precision": "bf16-mixed", "activation_checkpointing": True},
                                        {"zero_stage": 3}),
    "TP2 ZeRO-0 fp32": ({}, {"tp": 2}),
    "TP2 ZeRO-1 bf16-mixed dropout": ({"precision": "bf16-mixed", "dropout": 0.1}, {"tp": 2, "zero_stage": 1}),
    "TP2 ZeRO-1 bf16": ({"precision": "bf16"}, {"tp": 2, "zero_stage": 1}),
    "TP2+SP ZeRO-1 bf16": ({"precision": "bf16"}, {"tp": 2, "zero_stage": 1, "sequence_parallel": True}),
    "CP2 ZeRO-1 bf16": ({"precision": "bf16"}, {"context_parallel": 2, "zero_stage": 1}),
    "PP2 ZeRO-1 fp32": ({}, {"pp": 2, "zero_stage": 1}),
    "PP2 ZeRO-1 bf16": ({"precision": "bf16"}, {"pp": 2, "zero_stage": 1}),
    "PP2 ZeRO-1 bf16 recompute": ({"precision": "bf16", "activation_checkpointing": True}, {"pp": 2, "zero_stage": 1}),
    "PP2 ZeRO-0 fp32": ({}, {"pp": 2, "zero_stage": 0}),
}
QUICK_1 = ("ZeRO-1 fp32", "ZeRO-3 bf16")
QUICK_2 = ("DP2 ZeRO-0 fp32", "DP2 ZeRO-1 bf16", "DP2 ZeRO-2 fp32", "DP2 ZeRO-3 bf16", "TP2 ZeRO-1 bf16-mixed dropout",
           "TP2 ZeRO-1 bf16", "TP2+SP ZeRO-1 bf16", "CP2 ZeRO-1 bf16", "PP2 ZeRO-1 bf16")
DEFAULT_BUCKET = {"ZeRO-1 fp32, default 2e8 buckets": ({}, {"zero_stage": 1})}


def memory_table(quick: bool) -> list[str]:
    """Measured vs planned memory of real small runs."""
    from sedd_scale.testing.spawn import launch
    from sedd_scale.testing.step_memory import measure_cases, validation_recipe

    one = {k: v for k, v in CASES_1.items() if not quick or k in QUICK_1}
    two = {k: v for k, v in CASES_2.items() if not quick or k in QUICK_2}
    runs = [(1, one, BUCKET), (2, two, BUCKET), (1, DEFAULT_BUCKET, None)]
    rows = [f"{'layout':<34} {'rank':>4} {'stage':>5} | {'resident MiB':>21} | {'peak MiB':>21} | "
            f"{'fwd / bwd / step MiB, measured (planned)':<48}",
            f"{'':<34} {'':>4} {'':>5} | {'meas':>6} {'plan':>6} {'dev':>7} | {'meas':>6} {'plan':>6} {'dev':>7} |"]
    worst = 0.0
    peaks: dict[str, tuple[float, float]] = {}  # rank 0's (measured, planned) training peak
    for world, cases, bucket in runs:
        started = time.perf_counter()
        results = launch(measure_cases, world, cases, world, bucket, timeout=1800)
        seconds = time.perf_counter() - started
        for name, spec in cases.items():
            r = from_dict(Recipe, validation_recipe(*spec, world, bucket))
            c = P.candidate_of(r, r.layout(world))
            a = P.Assumptions(device="cpu")
            for rank, per_rank in enumerate(results):
                got = per_rank[name]
                mem = P.stage_memory(r, c, got["stage"], a)
                if rank == 0:
                    peaks[name] = (got["peak"], mem.training_peak)
                dev_r, dev_p = mem.phase("resident") / got["resident"] - 1, mem.training_peak / got["peak"] - 1
                worst = max(worst, abs(dev_r), abs(dev_p))
                phases = " / ".join(f"{got[k] / MiB:.1f} ({mem.phase(k) / MiB:.1f})" for k in P.TRAINING_PHASES
                                    if k in got)
                rows.append(f"{name:<34} {rank:>4} {got['stage']:>5} | {got['resident'] / MiB:>6.1f} "
                            f"{mem.phase('resident') / MiB:>6.1f} {dev_r:>+7.1%} | {got['peak'] / MiB:>6.1f} "
                            f"{mem.training_peak / MiB:>6.1f} {dev_p:>+7.1%} | {phases}")
        rows.append(f"  ({world} rank{'s' if world > 1 else ''}, {len(cases)} layouts: {seconds:.0f} s)")
    rows.append(f"largest deviation (resident and peak): {worst:.1%}")
    if {"TP2 ZeRO-1 bf16", "TP2+SP ZeRO-1 bf16"} <= peaks.keys():
        (m0, p0), (m1, p1) = peaks["TP2 ZeRO-1 bf16"], peaks["TP2+SP ZeRO-1 bf16"]
        rows.append(f"sequence parallelism at TP2 saves {(m0 - m1) / MiB:.2f} MiB of the training peak measured, "
                    f"{(p0 - p1) / MiB:.2f} MiB planned (the replicated half of each block's saved tensors)")
    if {"DP2 ZeRO-1 bf16", "CP2 ZeRO-1 bf16"} <= peaks.keys():
        (m0, p0), (m1, p1) = peaks["DP2 ZeRO-1 bf16"], peaks["CP2 ZeRO-1 bf16"]
        rows.append(f"context parallelism: CP2 (each rank half of every sequence) peaks {(m0 - m1) / MiB:.2f} MiB "
                    f"below DP2 (whole sequences) measured, {(p0 - p1) / MiB:.2f} MiB planned")
    rows.append("phases: measured = the peak inside engine.forward / engine.backward (which also all-reduces the DP "
                "gradients at a step boundary) / engine.step; planned = end of forward / backward peak / DP reduction "
                "+ optimizer step. Resident = between steps.")
    return rows


EVAL_CASES = {  # two ranks: (model overrides, parallel)
    "DP2 ZeRO-1 bf16": ({"precision": "bf16"}, {"zero_stage": 1}),
    "DP2 ZeRO-3 bf16": ({"precision": "bf16"}, {"zero_stage": 3}),
    "DP2 ZeRO-0 fp32": ({}, {"zero_stage": 0}),
    "PP2 ZeRO-1 bf16": ({"precision": "bf16"}, {"pp": 2, "zero_stage": 1}),
}
QUICK_EVAL = ("DP2 ZeRO-1 bf16", "PP2 ZeRO-1 bf16")


def measure_eval(cases: dict, world: int, bucket: int) -> dict:
    """On each rank: after a training step, the bytes alive between steps and the peaks of `Trainer.validate` (two
    micro-batches, 2 draws) and `Trainer.samples` (SAMPLE_BATCH sequences, 2 steps), every tensor counted."""
    import contextlib
    import copy
    import io
    import tempfile
    from types import SimpleNamespace

    import sedd_scale.compat  # noqa: F401  (before megatron-core / DeepSpeed)

    import torch
    from megatron.core import parallel_state as ps

    from sedd_scale.distributed import engine, parallel
    from sedd_scale.testing.step_memory import RandomTokens, validation_recipe
    from sedd_scale.testing.tensor_memory import LiveTensorMemory
    from sedd_scale.train.trainer import Trainer

    out = {}
    for name, spec in cases.items():
        try:
            with tempfile.TemporaryDirectory() as tmp:
                data = copy.deepcopy(validation_recipe(*spec, world, bucket))
                data.setdefault("checkpoint", {})["dir"] = tmp
                recipe = from_dict(Recipe, data)
                layout, topology = engine.setup(recipe)
                with LiveTensorMemory() as mem:
                    dp_rank = ps.get_data_parallel_rank()
                    loader = RandomTokens(recipe.model.num_tokens, layout.micro_batch, recipe.data.seq_len, dp_rank)
                    with contextlib.redirect_stdout(io.StringIO()):
                        trainer = Trainer(recipe, layout, topology, loader=loader)
                    trainer.train_step()
                    batches = [SimpleNamespace(tokens=next(iter(loader)), valid=torch.ones(layout.micro_batch,
                                                                                          dtype=torch.bool),
                                               index=i * layout.dp + dp_rank) for i in range(2)]
                    got = {"resident": mem.current, "stage": ps.get_pipeline_model_parallel_rank()}
                    mem.reset_peak()
                    trainer.validate(batches, draws=2)
                    got["validation"] = mem.peak
                    mem.reset_peak()
                    trainer.samples(P.SAMPLE_BATCH, steps=2)
                    got["sampling"] = mem.peak
                    trainer.saver.close()
                    del trainer
                out[name] = got
        finally:
            parallel.destroy_parallel()
    return out


def eval_table(quick: bool) -> list[str]:
    """Measured vs planned memory of validation and sampling (EMA.applied: the whole EMA gathered, weights cloned)."""
    from sedd_scale.testing.spawn import launch
    from sedd_scale.testing.step_memory import validation_recipe

    cases = {k: v for k, v in EVAL_CASES.items() if not quick or k in QUICK_EVAL}
    results = launch(measure_eval, 2, cases, 2, BUCKET, timeout=1800)
    rows = [f"{'layout':<20} {'rank':>4} {'stage':>5} | {'resident MiB':>14} | {'validation MiB':>21} | "
            f"{'sampling MiB':>21}",
            f"{'':<20} {'':>4} {'':>5} | {'meas':>6} {'plan':>7} | {'meas':>6} {'plan':>6} {'dev':>7} | "
            f"{'meas':>6} {'plan':>6} {'dev':>7}"]
    for name, spec in cases.items():
        r = from_dict(Recipe, validation_recipe(*spec, 2, BUCKET))
        c = P.candidate_of(r, r.layout(2))
        a = P.Assumptions(device="cpu")
        for rank, per_rank in enumerate(results):
            got = per_rank[name]
            mem = P.stage_memory(r, c, got["stage"], a)
            cells = " | ".join(f"{got[k] / MiB:>6.1f} {mem.phase(k) / MiB:>6.1f} {mem.phase(k) / got[k] - 1:>+7.1%}"
                               for k in P.EVAL_PHASES)
            rows.append(f"{name:<20} {rank:>4} {got['stage']:>5} | {got['resident'] / MiB:>6.1f} "
                        f"{mem.phase('resident') / MiB:>7.1f} | {cells}")
    rows.append("validation/sampling: the peak inside Trainer.validate / Trainer.samples after a training step; "
                "planned = the states between steps + the gathered EMA + the weights' clone + the evaluation's "
                "forward.")
    return rows


def deepspeed_table() -> list[str]:
    """Model states per GPU: the planner's optimizer-step phase vs DeepSpeed's estimators (TP 1, PP 1, DP N)."""
    import sedd_scale.compat  # noqa: F401  (before megatron-core / DeepSpeed)

    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    rows = [f"{'model':<8} {'GPUs':>5} | {'ZeRO-2: DeepSpeed':>17} {'planner':>8} | {'ZeRO-3: DeepSpeed':>17} "
            f"{'planner':>8} {'planner fwd/bwd':>15}  (GB, weights + gradients + optimizer)"]
    for name in ("sedd-1.3b-pp2.yaml", "sedd-7b-pp8.yaml"):
        r = load_recipe(os.path.join("recipes", name), ["parallel.pp=1", "parallel.tp=1"])
        sp = P.stage_params(r.model, 1, 1, 0)
        for n in (8, 64, 512):
            states = {}
            for zero in (2, 3):
                mem = P.stage_memory(r, P.Candidate.of(1, 1, n, zero, 1, 8, True), 0)
                states[zero] = [sum(getattr(mem.item(k), phase) for k in ("weights", "gradients", "optimizer"))
                                for phase in ("step", "backward")]
            _, ds2 = estimate_zero2_model_states_mem_needs(sp.total, n, 1, cpu_offload=False)
            _, ds3, _ = estimate_zero3_model_states_mem_needs(sp.total, sp.largest_module, n, 1, cpu_offload=False,
                                                              cpu_offload_params=False)
            rows.append(f"{name.split('-')[1]:<8} {n:>5} | {ds2 / 1e9:>17.2f} {states[2][0] / 1e9:>8.2f} | "
                        f"{ds3 / 1e9:>17.2f} {states[3][0] / 1e9:>8.2f} {states[3][1] / 1e9:>15.2f}")
    rows.append("ZeRO-2 agrees exactly (2 B + 18 B / N per parameter). DeepSpeed's ZeRO-3 estimate counts 4 B of the "
                "largest layer and 18 B / N, without the 2 B / N of the bf16 weights' own partition; in "
                "forward/backward the planner counts the parameters ZeRO-3 keeps gathered (up to "
                "stage3_max_live_parameters = 1e9, reused within stage3_max_reuse_distance = 1e9: 2 GB in bf16), "
                "not one layer.")
    return rows


def old_convention(m, seq_len: int) -> float:
    """What metrics.py logged before: 6 per parameter plus bidirectional attention (the PaLM appendix B count)."""
    return 6.0 * m.num_params(1) + 12.0 * m.n_blocks * m.hidden_size * seq_len


def flops_table() -> list[str]:
    """FLOPs per token: planner vs FlopCounterMode (small model, measured) and vs the old 6 x parameters convention."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    from sedd_scale.distributed import parallel
    from sedd_scale.distributed.pipeline import SEDDTrainModule, head_loss_config
    from sedd_scale.model.transformer import SEDD
    from sedd_scale.testing.step_memory import VALIDATION_MODEL

    rows = [f"{'model':<22} {'recompute':>9} | {'counted':>9} {'planner exec':>12} | {'planner model':>13} "
            f"{'old 6N':>10} {'old/model':>13}  (MFLOP per token; counted = FlopCounterMode + SDPA formulas)"]
    parallel.init_model_parallel(1)
    for recompute in (False, True):
        raw = {"model": {**VALIDATION_MODEL, "activation_checkpointing": recompute},
               "data": {"manifests": ["unused.json"], "tokenizer": None, "seq_len": VALIDATION_MODEL["length"]},
               "parallel": {"micro_batch": 4, "global_batch": 4}}
        r = from_dict(Recipe, raw)
        m = r.model
        module = SEDDTrainModule(SEDD(m, torch.device("cpu")), head_loss_config(m)).train()
        b, length = 4, m.length
        g = torch.Generator().manual_seed(0)
        x0 = torch.randint(0, m.num_tokens, (b, length), generator=g)
        masked = torch.rand(b, length, generator=g) < 0.5
        with FlopCounterMode(display=False) as counter:
            x_t = torch.where(masked, m.num_tokens, x0)
            module(x0, x_t, torch.rand(b, generator=g) + 0.1, torch.ones(b)).backward()
        shape = (b, m.n_heads, length, m.head_dim)
        attention = (sdpa_flop_count(shape, shape, shape) * (2 if recompute else 1)
                     + sdpa_backward_flop_count(shape, shape, shape, shape))
        counted = counter.get_total_flops() + m.n_blocks * attention
        f = P.flops_per_token(r, recompute, masked=float(masked.float().mean()))
        logged = old_convention(m, length)
        tokens = b * length
        rows.append(f"{'validation (measured)':<22} {'on' if recompute else 'off':>9} | "
                    f"{counted / tokens / 1e6:>9.2f} {f.executed / 1e6:>12.2f} | {f.model / 1e6:>13.2f} "
                    f"{logged / 1e6:>10.2f} {logged / f.model:>13.3f}")
    parallel.destroy_parallel()
    for name in ("sedd-small.yaml", "sedd-medium.yaml", "sedd-1.3b-pp2.yaml", "sedd-7b-pp8.yaml"):
        r = load_recipe(os.path.join("recipes", name))
        m = r.model
        f = P.flops_per_token(r, m.activation_checkpointing)
        logged = old_convention(m, r.data.seq_len)
        rows.append(f"{name:<22} {'on' if m.activation_checkpointing else 'off':>9} | {'':>9} "
                    f"{f.executed / 1e6:>12.1f} | {f.model / 1e6:>13.1f} {logged / 1e6:>10.1f} "
                    f"{logged / f.model:>13.3f}")
    rows.append("planner model = flops.training_flops_per_token (what the trainer logs MFU with). The old convention "
                "(6 FLOPs per parameter + 12 L H s) counted the input embedding (a lookup), the head over the padded "
                "vocabulary for every token (the fused loss projects the masked tokens' real vocabulary only) and "
                "adaLN per token (it runs once per sequence).")
    return rows


def recipes_table() -> list[str]:
    """The planner on the shipped recipes and the issue's layouts (H100)."""
    cases = [("sedd-1.3b-pp2.yaml", 16, []), ("sedd-1.3b-pp2.yaml (old TP2 PP2 micro 8, recompute)", 16,
              ["parallel.tp=2", "parallel.micro_batch=8", "model.activation_checkpointing=true"]),
             ("sedd-7b-pp8.yaml", 64, []), ("sedd-7b-pp8.yaml (old TP4 PP4 micro 4, recompute)", 64,
              ["parallel.tp=4", "parallel.pp=4", "parallel.micro_batch=4", "model.activation_checkpointing=true"]),
             ("sedd-7b-pp8.yaml (old TP4 PP4 micro 4, recompute)", 1024,
              ["parallel.tp=4", "parallel.pp=4", "parallel.micro_batch=4", "model.activation_checkpointing=true"]),
             ("sedd-7b-pp8.yaml", 1024, []),
             ("sedd-7b-pp8.yaml (global batch 4096)", 1024, ["parallel.global_batch=4096"]),
             ("sedd-7b-pp8.yaml (TP1 PP1)", 64, ["parallel.pp=1"]),
             ("sedd-7b-pp8.yaml (TP1 PP1)", 8, ["parallel.pp=1"])]
    rows = [f"{'recipe':<52} {'GPUs':>5} {'layout':<52} {'GB/GPU':>7} {'bubble':>7} {'step s':>7} {'tokens/s':>10} "
            f"{'MFU':>6}  warnings"]
    for name, world, overrides in cases:
        r = load_recipe(os.path.join("recipes", name.split(" ")[0]), overrides)
        p = P.plan(r, P.candidate_of(r, r.layout(world)))
        warned = "; ".join(w.split(":")[0] if w.startswith("memory") else w.split(" (")[0].split(":")[0]
                           for w in p.warnings) or "-"
        rows.append(f"{name:<52} {world:>5} {p.candidate.describe():<52} {p.needed_bytes / 1e9:>7.1f} {p.bubble:>7.1%} "
                    f"{p.time.total:>7.3g} {p.tokens_per_s:>10,.0f} {p.mfu:>6.1%}  {warned}")
    seven = load_recipe("recipes/sedd-7b-pp8.yaml")
    rows += [P.format_batch_proposal(seven, w, P.propose_global_batch(seven, w)) for w in (64, 1024)]
    started = time.perf_counter()
    total = sum(len(P.candidates(load_recipe("recipes/sedd-7b-pp8.yaml"), w)) for w in (64, 1024))
    for w in (64, 1024):
        P.propose(load_recipe("recipes/sedd-7b-pp8.yaml"), w)
    rows.append(f"--propose for the 7B at 64 and 1,024 GPUs: {total} candidate layouts in "
                f"{time.perf_counter() - started:.2f} s")
    return rows


LONG_RECIPE = "recipes/sedd-7b-8k.yaml"
# (GPUs, the recipe's layout at that size): at 1,024 GPUs its 64 sequences need DP <= 64, hence CP 8; ZeRO-2 (one
# micro-batch per step: no bf16 accumulation) lets overlap_comm act.
LONG_BASES = ((64, ()), (1024, ("parallel.context_parallel=8", "parallel.zero_stage=2")))
LONG_CHANGES = (("as shipped", ()), ("SP off", ("parallel.sequence_parallel=false",)),
                ("CP off", ("parallel.context_parallel=1",)),
                ("overlap_comm off", ("parallel.zero_overlap_comm=false",)))


def long_sequence_rows() -> list[dict]:
    """Per (GPUs, change): the layout, the planner's GB per GPU (whole run, training alone), step time, MFU and the
    `python -m sedd_scale.config` options that print the plan (layout None: the world size admits none)."""
    rows = []
    for world, base in LONG_BASES:
        for label, change in LONG_CHANGES:
            changed = {c.split("=")[0] for c in change}
            sets = [*(s for s in base if s.split("=")[0] not in changed), *change]
            row = {"world": world, "change": label,
                   "options": f"--world-size {world}" + "".join(f" --set {s}" for s in sets)}
            r = load_recipe(LONG_RECIPE, sets)
            try:
                layout = r.layout(world)
            except ValueError as e:  # CP off at 1,024 GPUs: DP 512 > the 64 sequences of a step
                rows.append({**row, "layout": None, "why": str(e).split(":")[0]})
                continue
            p = P.plan(r, P.candidate_of(r, layout))
            rows.append({**row, "layout": p.candidate.describe().replace(" recompute off", ""),
                         "gb": p.needed_bytes / 1e9, "train_gb": P.device_bytes(p.worst.training_peak,
                                                                                p.assumptions) / 1e9,
                         "step": p.time.total, "mfu": p.mfu})
    return rows


def long_sequence_markdown(row: dict) -> str:
    """One row of README's long-sequence table."""
    if row["layout"] is None:
        return f"| {row['world']:,} | {row['change']} | no layout ({row['why']}) | - | - | - | - | `{row['options']}` |"
    return (f"| {row['world']:,} | {row['change']} | {row['layout']} | {row['gb']:.1f} | {row['train_gb']:.1f} | "
            f"{row['step']:.3g} | {row['mfu']:.1%} | `{row['options']}` |")


def long_sequence_table() -> list[str]:
    """The 7B at 8,192 tokens: what SP, CP and ZeRO's overlap_comm each change in the planner's memory and time, as
    a table and as README's markdown rows."""
    rows = [f"{'GPUs':>5} {'change':<17} {'layout':<48} {'GB/GPU':>7} {'train GB':>8} {'step s':>7} {'MFU':>6}  "
            f"python -m sedd_scale.config {LONG_RECIPE} ..."]
    found = long_sequence_rows()
    for row in found:
        if row["layout"] is None:
            rows.append(f"{row['world']:>5} {row['change']:<17} {'no layout: ' + row['why']:<74}  {row['options']}")
            continue
        rows.append(f"{row['world']:>5} {row['change']:<17} {row['layout']:<48} {row['gb']:>7.1f} "
                    f"{row['train_gb']:>8.1f} {row['step']:>7.3g} {row['mfu']:>6.1%}  {row['options']}")
    rows.append("GB/GPU: the planner's need per GPU (tensor peak x 1.05 + 2.5 GB), whose peak is sampling's "
                "full-vocabulary log-scores of 3 x 8,192 positions; train GB: the same for a training step alone (no "
                "validation or sampling). H100 80 GB, matmuls at 50% of 989 TFLOP/s. README's rows:")
    rows += [long_sequence_markdown(row) for row in found]
    return rows


def main() -> None:
    """Print every table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="measure fewer layouts")
    parser.add_argument("--long-sequence", action="store_true",
                        help="print only the long-sequence table (README's SP / CP / overlap_comm numbers)")
    args = parser.parse_args()
    os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if args.long_sequence:
        print("\n".join(long_sequence_table()))
        return
    for title, table in (("1. memory: measured (real CPU runs) vs planned", lambda: memory_table(args.quick)),
                         ("1b. validation and sampling: measured (real CPU runs) vs planned",
                          lambda: eval_table(args.quick)),
                         ("2. model states vs DeepSpeed's estimators", deepspeed_table),
                         ("3. FLOPs per token", flops_table),
                         ("4. plans (H100 80 GB, 989 TFLOP/s, matmuls at 50%)", recipes_table),
                         ("5. long sequences: SP, CP and overlap_comm on vs off (planner)", long_sequence_table)):
        print(f"\n{title}")
        print("\n".join(table()), flush=True)


if __name__ == "__main__":
    main()
