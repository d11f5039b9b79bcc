"""Plans and proposals as text, for the pre-flight check."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from sedd_scale.plan.flops import projected_fraction
from sedd_scale.plan.hardware import GB
from sedd_scale.plan.memory import PHASES, SAMPLE_BATCH, Candidate, device_bytes, overlaps_reduction
from sedd_scale.plan.search import STARVED, BatchProposal, Plan, candidates
from sedd_scale.plan.speed import group_bandwidth, p2p_bandwidth

if TYPE_CHECKING:  # the planner reads recipes; the recipe CLI imports the planner
    from sedd_scale.config import Recipe


# ---------------------------------------------------------------------------------------------
# Text.
def _gb(x: float) -> str:
    return f"{x / GB:.2f}"


def format_plan(recipe: "Recipe", p: Plan) -> str:
    """The plan as a table (one column per distinct pipeline stage), its time estimate, assumptions and warnings."""
    c, a = p.candidate, p.assumptions
    if c.pp == 1:
        heads = ["per GPU"]
    else:
        heads = [("stage 0" if s.stage == 0 else f"stage {c.pp - 1}" if s.stage == c.pp - 1 else f"stages 1-{c.pp - 2}")
                 for s in p.memory]
    rows: list[tuple[str, list[str], str]] = [
        ("parameters held", [f"{s.params.total / 1e6:,.1f}M" for s in p.memory], "this GPU's TP/PP shard")]
    labels = []
    for s in p.memory:
        labels += [line.label for line in s.lines if line.label not in labels]
    for label in labels:
        lines = [next((ln for ln in s.lines if ln.label == label), None) for s in p.memory]
        note = next(ln.note for ln in lines if ln is not None)
        rows.append((f"{label} (GB)", ["-" if ln is None else _gb(ln.most) for ln in lines], note))
    rows.append(("activations, recompute on/off (GB)",
                 [f"{_gb(s.activations_recompute)}/{_gb(s.activations_no_recompute)}" for s in p.memory],
                 "saved + the backward's extra, at this micro batch"))
    for name in PHASES:
        rows.append((f"total at {name} (GB)", [_gb(s.phase(name)) for s in p.memory], ""))
    rows.append(("needed per GPU (GB)", [_gb(device_bytes(s.peak, a)) for s in p.memory],
                 f"peak x {1 + a.fragmentation:g} + {a.reserve_bytes / GB:g} GB CUDA/NCCL, of "
                 f"{p.gpu.memory_bytes / GB:.0f} GB"))
    width = max(len(r[0]) for r in rows)
    col = max(10, *(len(h) for h in heads), *(len(x) for r in rows for x in r[1]))
    out = [f"plan: {p.gpu.name} ({p.gpu.memory_bytes / GB:.0f} GB), {c.describe()}",
           "  " + " " * width + "".join(f"  {h:>{col}}" for h in heads)]
    for label, cells, note in rows:
        out.append("  " + f"{label:<{width}}" + "".join(f"  {x:>{col}}" for x in cells) + (f"  {note}" if note else ""))
    t, f = p.time, p.flops
    out.append(f"  pipeline bubble: {p.bubble:.1%} (1F1B: (pp - 1) / (grad_accum + pp - 1) = "
               f"{c.pp - 1}/{c.grad_accum + c.pp - 1})")
    tp_what = "TP all-gather/reduce-scatter (SP) + loss gather" if c.sp else "TP all-reduce"
    out.append(f"  step: ~{t.total:.3g} s = compute {t.compute:.3g} + {tp_what} {t.tp_comm:.3g}"
               + (f" + CP all-to-all {t.cp_comm:.3g}" if c.cp > 1 else "") + f" + pipeline "
               f"p2p {t.p2p:.3g} + bubble {t.bubble:.3g} + DP exchange {t.dp_comm:.3g} exposed"
               + (f" ({t.dp_hidden:.3g} more hidden behind compute)" if t.dp_hidden > 0 else "")
               + f"; {p.tokens_per_s:,.0f} "
               f"tokens/s; MFU {p.mfu:.1%} of {p.peak_tflops:g} TFLOP/s")
    n = c.data_group_size
    out.append(f"  network: {'DP x CP' if c.cp > 1 else 'DP'} group of {n} ranks {c.tp} apart at "
               f"{group_bandwidth(n, c.tp, a) / 1e9:.4g} GB/s per rank"
               + (f", TP at {group_bandwidth(c.tp, 1, a) / 1e9:.4g} GB/s" if c.tp > 1 else "")
               + (f", CP all-to-alls at {group_bandwidth(c.cp, c.tp, a) / 1e9:.4g} GB/s" if c.cp > 1 else "")
               + (f", pipeline sends at {p2p_bandwidth(c, a) / 1e9:.4g} GB/s" if c.pp > 1 else "")
               + " (ring all-reduce 2 (n - 1) / n x bytes / B, B = min(NVLink, node network x members per node "
               "/ GPUs per node))")
    out.append(f"  FLOPs per token: model {f.model / 1e9:.4g} G, executed {f.executed / 1e9:.4g} G (matmuls only; "
               f"the loss projects {projected_fraction(recipe):.3f} of the tokens)")
    out.append(f"  assumes: matmuls at {a.efficiency:.0%} of peak"
               + (f" ({p.gpu.tf32_tflops:g} TFLOP/s TF32 for fp32)" if recipe.model.precision == "fp32" else "")
               + f" + {a.block_overhead_s * 1e3:g} ms per block per micro-batch; NVLink {a.intra_node_gbps:g} GB/s "
               f"per GPU, {a.inter_node_gbps:g} GB/s of network per node of {a.gpus_per_node} GPUs; "
               + _overlap_assumption(recipe, c)
               + f"; validation and sampling peaks with {SAMPLE_BATCH} samples")
    out += [f"warning: {w}" for w in p.warnings]
    return "\n".join(out)


def _overlap_assumption(recipe: "Recipe", c: Candidate) -> str:
    """What the step time assumes about overlapping communication with compute, for this layout."""
    tp_pp = "TP all-reduces and pipeline sends not overlapped with compute"
    if c.data_group_size == 1:
        return tp_pp
    if not overlaps_reduction(recipe, c):
        why = ("parallel.zero_overlap_comm is false" if not recipe.parallel.zero_overlap_comm else
               "DeepSpeed's pipeline engine does not overlap it" if c.pp > 1 else
               "no ZeRO optimizer" if c.zero_stage == 0 else "BF16_Optimizer reduces after the backward")
        return f"{tp_pp}, nor the DP exchange ({why})"
    what = ("the DP reduce-scatters and weight gathers overlap the forward and backward (ZeRO-3 prefetch of "
            f"{recipe.parallel.zero_prefetch_bucket_size:.3g} elements)" if c.zero_stage == 3 else
            "the DP gradient reduce-scatter overlaps the backward")
    return (f"{tp_pp}; {what} (overlap_comm, {recipe.parallel.zero_reduce_bucket_size:.3g}-element buckets: the "
            "last bucket and whatever exceeds the compute stay exposed; the weight all-gather after the step does "
            "not overlap)" if c.zero_stage < 3 else f"{tp_pp}; {what}, exposed: the first prefetch, the last "
            f"reduce bucket ({recipe.parallel.zero_reduce_bucket_size:.3g} elements) and whatever exceeds the compute")


def format_proposals(recipe: "Recipe", world_size: int, plans: list[Plan], limit: int = 10) -> str:
    """The fastest fitting layouts (`propose`'s result for `world_size`) as a table."""
    if not plans:
        if not candidates(recipe, world_size):
            return (f"no layout exists for {world_size} GPUs: it must be tp x cp x pp x dp with tp x cp dividing "
                    f"model.n_heads={recipe.model.n_heads} (tp at most the GPUs of a node), pp dividing "
                    f"model.n_blocks={recipe.model.n_blocks} and dp dividing parallel.global_batch="
                    f"{recipe.parallel.global_batch}")
        return f"no layout fits {world_size} GPUs: more GPUs, a smaller model or a GPU with more memory is needed"
    out = [f"{len(plans)} layouts fit; the fastest {min(limit, len(plans))}:"]
    if recipe.model.precision == "bf16":
        out.append("(left out: ZeRO-0/2/3 with gradient accumulation, which sum the micro-batches' gradients in bf16)")
    out.append(f"{'tp':>3} {'sp':>3} {'cp':>3} {'pp':>3} {'dp':>5} {'zero':>4} {'micro':>5} {'accum':>5} {'recomp':>6} "
               f"{'GB/GPU':>7} {'bubble':>7} {'step s':>7} {'tokens/s':>11} {'MFU':>6}")
    shown, either = _merge_sp_twins(plans, limit)
    for p in shown:
        c = p.candidate
        sp = "any" if id(p) in either else "on" if c.sp else "-"
        out.append(f"{c.tp:>3} {sp:>3} {c.cp:>3} {c.pp:>3} {c.dp:>5} {c.zero_stage:>4} "
                   f"{c.micro_batch:>5} {c.grad_accum:>5} "
                   f"{'on' if c.recompute else 'off':>6} {p.needed_bytes / GB:>7.1f} {p.bubble:>7.1%} "
                   f"{p.time.total:>7.3g} {p.tokens_per_s:>11,.0f} {p.mfu:>6.1%}")
    if either:
        out.append("(sp any: sequence parallelism on and off plan alike, to 0.1 GB and 0.5% of the step: one row)")
    return "\n".join(out)


def _merge_sp_twins(plans: list[Plan], limit: int) -> tuple[list[Plan], set[int]]:
    """The first `limit` plans, a layout whose SP-on and SP-off twins plan alike (GB/GPU to 0.1, step within 0.5%)
    shown once: the faster, its id in the returned set."""
    shown: list[Plan] = []
    either: set[int] = set()
    seen: dict[Candidate, Plan] = {}
    for p in plans:
        if len(shown) == limit:
            break
        twin = seen.get(dataclasses.replace(p.candidate, sp=not p.candidate.sp)) if p.candidate.tp > 1 else None
        if (twin is not None and round(twin.needed_bytes / GB, 1) == round(p.needed_bytes / GB, 1)
                and abs(p.time.total / twin.time.total - 1) <= 0.005):
            either.add(id(twin))
            continue
        seen[p.candidate] = p
        shown.append(p)
    return shown, either


def format_batch_proposal(recipe: "Recipe", world_size: int, b: BatchProposal | None) -> str:
    """The larger-global-batch proposal (`propose_global_batch`), labelled as the hyperparameter change it is."""
    g = recipe.parallel.global_batch
    if b is None:
        return (f"global batch: {g} sequences keep {world_size} GPUs busy (its fastest layout reaches at least "
                f"{STARVED:.0%} of the MFU of any power-of-two multiple up to 64x)")
    c, now = b.plan.candidate, b.current
    was = (f"the fastest layout at {g} sequences reaches MFU {now.mfu:.1%} (bubble {now.bubble:.0%}, "
           f"{now.tokens_per_s:,.0f} tokens/s)" if now else f"nothing fits at {g} sequences")
    return (f"global batch (CHANGES THE TRAINING HYPERPARAMETERS): at {world_size} GPUs {was}; "
            f"parallel.global_batch: {b.global_batch} ({b.multiple}x, {b.tokens_per_step:,} tokens per step) "
            f"reaches MFU {b.plan.mfu:.1%} (best over multiples up to 64x: {b.best_mfu:.1%}) with {c.describe()}, "
            f"bubble {b.plan.bubble:.1%}, {b.plan.time.total:.3g} s per step. The learning rate, warmup and step "
            f"count were tuned for {g} sequences: re-tune them (train.steps x {g} / {b.global_batch} keeps the "
            "tokens seen)")
