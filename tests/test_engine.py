"""DeepSpeed + megatron-core plumbing (sedd_scale.distributed.engine) against a float64 single-process oracle.

A toy residual MLP of megatron-core tensor-parallel layers (ColumnParallelLinear -> GELU ->
RowParallelLinear per block) trains for two optimizer steps (AdamW with weight decay on matrices,
gradient accumulation, clipping that binds) under each layout, through `build_engine`: a plain
engine with the mpu adapter when PP = 1, a DeepSpeed PipelineModule when PP > 1. The oracle is the
same network as plain float64 torch in one process. Tolerances (fp32): losses rel 1e-5, grad
norms rel 1e-5, weights abs 5e-6 (fp32 arithmetic vs float64; one Adam step moves a weight by
~lr = 1e-2). bf16 runs are checked more loosely (see the test).
"""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.megatron  # rerun under megatron-core 0.19.x by tools/test.sh

D, F, BLOCKS = 8, 16, 2  # width, hidden width (TP-split), blocks (PP-split)
MICRO, GLOBAL, STEPS, LR, CLIP, WD = 2, 8, 2, 1e-2, 0.05, 0.1
TIMEOUT_MIN = 3  # parallel.distributed_timeout_minutes: none of the defaults (torch 10/30, megatron 30, launcher 2)


def full_weights(i: int) -> dict[str, torch.Tensor]:
    """Block i's unsharded weights, float64."""
    g = torch.Generator().manual_seed(100 + i)
    return {"w1": torch.randn(F, D, generator=g, dtype=torch.float64) * 0.5,
            "b1": torch.randn(F, generator=g, dtype=torch.float64) * 0.5,
            "w2": torch.randn(D, F, generator=g, dtype=torch.float64) * 0.5,
            "b2": torch.randn(D, generator=g, dtype=torch.float64) * 0.5}


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of optimizer step `step`: inputs and targets, (GLOBAL, D) float64."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL, D, generator=g, dtype=torch.float64)
    return x, torch.randn(GLOBAL, D, generator=g, dtype=torch.float64)


def micro_batches(step: int, dp_rank: int, dp: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Data-parallel rank `dp_rank`'s micro batches of step `step` (fp32); all ranks together cover the batch."""
    x, y = batch(step)
    rows = [slice((j * dp + dp_rank) * MICRO, (j * dp + dp_rank + 1) * MICRO) for j in range(GLOBAL // (MICRO * dp))]
    return [(x[r].float(), y[r].float()) for r in rows]


def oracle() -> dict:
    """Plain float64 torch, one process: per-step losses, pre-clip grad norms, final weights."""
    params = {(i, k): v.clone().requires_grad_() for i in range(BLOCKS) for k, v in full_weights(i).items()}
    matrices = [p for (_, k), p in params.items() if k.startswith("w")]
    vectors = [p for (_, k), p in params.items() if k.startswith("b")]
    opt = torch.optim.AdamW([{"params": matrices, "weight_decay": WD}, {"params": vectors, "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.999), eps=1e-8)
    losses, norms = [], []
    for step in range(STEPS):
        x, y = batch(step)
        h = x
        for i in range(BLOCKS):
            p = {k: params[(i, k)] for k in ("w1", "b1", "w2", "b2")}
            h = h + torch.nn.functional.gelu(h @ p["w1"].T + p["b1"]) @ p["w2"].T + p["b2"]
        loss = ((h - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(list(params.values()), CLIP).item())
        opt.step()
        losses.append(loss.item())
    return {"losses": losses, "norms": norms, "weights": {k: v.detach() for k, v in params.items()}}


# --- the distributed side (runs in worker processes) -------------------------------------------
class Block(torch.nn.Module):
    """h + RowParallel(gelu(ColumnParallel(h))), weights set to this TP rank's shard of full_weights(index)."""

    def __init__(self, index: int):
        super().__init__()
        import sedd_scale.compat  # noqa: F401

        from megatron.core import parallel_state as ps
        from megatron.core import tensor_parallel
        from megatron.core.model_parallel_config import ModelParallelConfig

        tp, r = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        config = ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True,
                                     params_dtype=torch.float32, gradient_accumulation_fusion=False)
        init = torch.nn.init.zeros_
        self.index = index
        self.col = tensor_parallel.ColumnParallelLinear(D, F, config=config, init_method=init, bias=True,
                                                        gather_output=False)
        self.row = tensor_parallel.RowParallelLinear(F, D, config=config, init_method=init, bias=True,
                                                     input_is_parallel=True, skip_bias_add=False)
        w, shard = full_weights(index), slice(r * F // tp, (r + 1) * F // tp)
        with torch.no_grad():
            self.col.weight.copy_(w["w1"][shard])
            self.col.bias.copy_(w["b1"][shard])
            self.row.weight.copy_(w["w2"][:, shard])
            self.row.bias.copy_(w["b2"])

    def forward(self, h):
        return h + self.row(torch.nn.functional.gelu(self.col(h)[0]))[0]


def mse(h, y):
    """The toy's loss."""
    return ((h - y) ** 2).mean()


class Net(torch.nn.Module):
    """All blocks in one module (PP = 1)."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(Block(i) for i in range(BLOCKS))

    def forward(self, x, y):
        for b in self.blocks:
            x = b(x)
        return mse(x, y)


def toy_recipe(tp: int, pp: int, zero: int, precision: str = "fp32", parallel: dict | None = None):
    """A Recipe for the toy: only optim, parallel (`parallel`: more keys) and model.precision matter (the model
    section is not built)."""
    from sedd_scale.config import Recipe, from_dict

    return from_dict(Recipe, {
        "model": {"precision": precision}, "data": {"manifests": ["unused/manifest.json"]},
        "optim": {"lr": LR, "warmup": 0, "weight_decay": WD, "grad_clip": CLIP},
        "parallel": {"tp": tp, "pp": pp, "zero_stage": zero, "micro_batch": MICRO, "global_batch": GLOBAL,
                     "distributed_timeout_minutes": TIMEOUT_MIN, **(parallel or {})},
        "train": {"steps": STEPS},
    })


def run_layout(tp: int, pp: int, zero: int, precision: str = "fp32", keys: dict | None = None) -> dict:
    """Train the toy under (tp, pp, zero) (`keys`: more parallel.* recipe keys) on all launched ranks; return this
    rank's losses, norms, weight shards."""
    import sedd_scale.compat  # noqa: F401  (before megatron-core / DeepSpeed)

    import deepspeed
    import torch.distributed as dist
    from deepspeed.pipe import LayerSpec, PipelineModule
    from megatron.core import parallel_state as ps

    from sedd_scale.distributed import engine, parallel

    recipe = toy_recipe(tp, pp, zero, precision, keys)
    layout = recipe.layout(dist.get_world_size())
    topology = engine.init_layout(layout, engine.timeout_s(recipe))
    megatron_groups = {"tp": ps.get_tensor_model_parallel_group(), "pp": ps.get_pipeline_model_parallel_group(),
                       "dp": ps.get_data_parallel_group()}
    timeouts = {name: parallel.group_timeout(g) for name, g in megatron_groups.items()}  # as megatron-core made them
    torch.manual_seed(0)
    if pp > 1:
        model = PipelineModule(layers=[LayerSpec(Block, i) for i in range(BLOCKS)], topology=topology, loss_fn=mse,
                               partition_method="uniform")
    else:
        model = Net()
    eng = engine.build_engine(model, recipe, layout)
    timeouts["all"] = parallel.group_timeouts()  # DeepSpeed's pipeline groups too
    dp_rank, dp = ps.get_data_parallel_rank(), layout.dp
    losses, norms = [], []
    for step in range(STEPS):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        micro = [(x.to(dtype), y.to(dtype)) for x, y in micro_batches(step, dp_rank, dp)]
        if pp > 1:
            losses.append(eng.train_batch(data_iter=iter(micro)).item())
        else:
            total = 0.0
            for x, y in micro:
                loss = eng(x, y)
                eng.backward(loss)
                eng.step()
                total += loss.item() / len(micro)
            t = torch.tensor([total])
            dist.all_reduce(t, group=ps.get_data_parallel_group())
            losses.append(t.item() / dp)
        norms.append(float(eng.get_global_grad_norm()))
    blocks = [m for m in eng.module.modules() if isinstance(m, Block)]
    params = [p for b in blocks for p in b.parameters()]
    with deepspeed.zero.GatheredParameters(params, enabled=zero == 3):
        names = {"w1": ("col", "weight"), "b1": ("col", "bias"), "w2": ("row", "weight"), "b2": ("row", "bias")}
        shards = {(b.index, k): getattr(b, layer).__getattr__(attr).detach().float().clone()
                  for b in blocks for k, (layer, attr) in names.items()}
    inner = eng.optimizer
    while not isinstance(inner, torch.optim.Optimizer) or hasattr(inner, "optimizer"):  # DeepSpeed's wrappers
        inner = inner.optimizer
    result = {"tp_rank": ps.get_tensor_model_parallel_rank(), "inner_optimizer": type(inner).__name__,
              "backward_allreduce": eng.enable_backward_allreduce, "direct": eng.optimizer is inner,
              "skipped": inner.skipped_total, "pp_rank": ps.get_pipeline_model_parallel_rank(),
              "dp_rank": dp_rank, "losses": losses, "norms": norms, "shards": shards,
              "zero_optimizer": type(eng.optimizer).__name__, "timeouts": timeouts,
              # what DeepSpeed read from the config, and what its ZeRO-1/2 optimizer runs with
              "zero_read": {"overlap_comm": eng.zero_overlap_comm(),
                            "reduce_bucket_size": eng.zero_reduce_bucket_size(),
                            "prefetch_bucket_size": eng.zero_prefetch_bucket_size()} if zero else None,
              "optimizer_overlap": getattr(eng.optimizer, "overlap_comm", None)}
    ps.destroy_model_parallel()
    return result


def topology_mismatch() -> str:
    """Megatron groups built in a non-default rank order must fail the topology check."""
    import sedd_scale.compat  # noqa: F401  (before megatron-core / DeepSpeed)

    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
    from megatron.core import parallel_state as ps

    from sedd_scale.distributed import engine

    ps.initialize_model_parallel(pipeline_model_parallel_size=2, order="tp-cp-ep-pp-dp")
    try:
        engine.check_topology(PipeModelDataParallelTopology(num_pp=2, num_mp=1, num_dp=2))
    except RuntimeError as e:
        return str(e)
    finally:
        ps.destroy_model_parallel()
    return ""


def run_cases(cases: list[tuple[int, int, int]], with_mismatch: bool = False) -> dict:
    """Worker entry: every case in one process launch (imports dominate the cost)."""
    from sedd_scale.distributed import engine

    engine.init_world(timeout_s=120)  # joins the group tests/dist.py created
    out = {case: run_layout(*case) for case in cases}
    if with_mismatch:
        out["mismatch"] = topology_mismatch()
    return out


def assemble(results: list[dict], case) -> dict:
    """Full weights from the DP-rank-0 shards of every TP and PP rank."""
    parts: dict = {}
    for r in results:
        res = r[case]
        if res["dp_rank"] != 0:
            continue
        for key, t in res["shards"].items():
            parts.setdefault(key, {})[res["tp_rank"]] = t
    full = {}
    for (i, k), by_tp in parts.items():
        shards = [by_tp[t] for t in sorted(by_tp)]
        if k == "b2":  # the row-parallel bias is replicated over TP
            assert all(torch.equal(s, shards[0]) for s in shards), f"block {i} {k} differs across TP ranks"
            full[(i, k)] = shards[0]
        else:
            full[(i, k)] = torch.cat(shards, dim=1 if k == "w2" else 0)
    return full


def check_against_oracle(results: list[dict], case, ref: dict, rtol: float = 1e-5, wtol: float = 5e-6) -> float:
    """Assert losses, grad norms and weights of `case` match the oracle; return the max weight error."""
    for r in results:  # every rank reports the same (DP-averaged) loss and the global norm
        res = r[case]
        for what in ("losses", "norms"):
            torch.testing.assert_close(torch.tensor(res[what], dtype=torch.float64),
                                       torch.tensor(ref[what], dtype=torch.float64),
                                       rtol=rtol, atol=0, msg=lambda m: f"{case} {what}: {m}")
    full = assemble(results, case)
    assert set(full) == set(ref["weights"]), f"{case}: gathered {sorted(full)}"
    err = max((full[k].double() - ref["weights"][k]).abs().max().item() for k in full)
    moved = max((ref["weights"][k] - full_weights(k[0])[k[1]]).abs().max().item() for k in full)
    assert moved > 1e-3, "the oracle's weights did not move: the test would not see a wrong update"
    assert err < wtol, f"{case}: max |weight - oracle| = {err:.2e}"
    return err


def test_oracle_clipping_binds():
    """The chosen clip value is below the gradient norm, so the TP/PP-aware norm is exercised."""
    ref = oracle()
    assert min(ref["norms"]) > 4 * CLIP


@pytest.mark.slow
def test_two_process_layouts_match_one_process():
    """TP=2, PP=2, DP=2 (ZeRO-0/1/2/3) on 2 processes equal the single-process oracle; bf16 within bf16 rounding."""
    from tests.dist import launch

    fp32 = [(2, 1, 0), (1, 2, 1), (1, 1, 0), (1, 1, 1), (1, 1, 2), (1, 1, 3)]
    bf16 = [(2, 1, 1, "bf16"), (1, 2, 1, "bf16"), (1, 1, 3, "bf16")]
    results = launch(run_cases, 2, fp32 + bf16)
    ref = oracle()
    for case in fp32:
        check_against_oracle(results, case, ref)
    for case in fp32 + bf16:  # DeepSpeed wraps the trainer's own optimizer, which stepped every time
        assert all(r[case]["inner_optimizer"] == "GuardedAdamW" and r[case]["skipped"] == 0 for r in results)
    # Without ZeRO and without data parallelism (TP2) DeepSpeed's gradient all-reduce over a group of one is off,
    # and the result still equals the oracle (checked above); DP2 keeps it.
    assert [results[0][case]["backward_allreduce"] for case in ((2, 1, 0), (1, 1, 0))] == [False, True]
    assert results[0][(2, 1, 0)]["direct"] and not results[0][(1, 1, 1)]["direct"]
    # bf16 weights: losses within bf16 rounding (2^-8 relative), weights within a few bf16 ulps of |w| < 4.
    for case in bf16:
        check_against_oracle(results, case, ref, rtol=2e-2, wtol=4e-2)
    optimizers = {case: results[0][case]["zero_optimizer"] for case in fp32 + bf16}
    assert optimizers[(1, 1, 2)] == "DeepSpeedZeroOptimizer"
    assert optimizers[(1, 1, 3)] == optimizers[(1, 1, 3, "bf16")] == "DeepSpeedZeroOptimizer_Stage3"
    # ZeRO-1 with bf16: fp32 master weights and fp32 gradient accumulation
    assert optimizers[(2, 1, 1, "bf16")] == optimizers[(1, 2, 1, "bf16")] == "BF16_Optimizer"
    # parallel.distributed_timeout_minutes reaches megatron's groups as they are created, and every group once the
    # engine exists: the default one (the launcher made it with 2 min), DeepSpeed's pipeline grid and p2p groups
    # (torch's default for new groups is 30 min under gloo).
    for r in results:
        timeouts = r[(1, 2, 1)]["timeouts"]
        assert [timeouts[k] for k in ("tp", "pp", "dp")] == [TIMEOUT_MIN * 60.0] * 3
        assert len(timeouts["all"]) > 5 and set(timeouts["all"]) == {TIMEOUT_MIN * 60.0}, timeouts["all"]


@pytest.mark.slow
def test_four_process_layouts_match_one_process():
    """TP2 x PP2, PP2 x DP2, TP2 x DP2 with ZeRO-2/3 on 4 processes equal the oracle; a mis-ordered topology is
    caught."""
    from tests.dist import launch

    cases = [(2, 2, 1), (1, 2, 1), (2, 1, 2), (2, 1, 3)]
    results = launch(run_cases, 4, cases, True)
    ref = oracle()
    for case in cases:
        check_against_oracle(results, case, ref)
        assert all(r[case]["inner_optimizer"] == "GuardedAdamW" and r[case]["skipped"] == 0 for r in results)
    mismatches = [r["mismatch"] for r in results]
    assert all("differs from DeepSpeed's 'data' axis" in m for m in mismatches), mismatches


def test_guarded_adamw_skips_on_a_non_finite_global_norm():
    """A NaN/inf norm (or DeepSpeed's -1 sentinel) makes step() a no-op flagged as `overflow`; `record` counts; without
    a norm source (under a DeepSpeed wrapper, which tests the norm itself) every step is taken."""
    from sedd_scale.distributed.optim import GuardedAdamW

    w = torch.nn.Parameter(torch.ones(3))
    opt = GuardedAdamW([w], lr=0.1, fused=True)
    norm = [float("inf")]
    opt.grad_norm = lambda: norm[0]
    for value in (float("inf"), float("nan"), -1.0):
        norm[0] = value
        w.grad = torch.ones(3)
        opt.step()
        opt.record(not opt.overflow)
        assert opt.overflow and torch.equal(w.detach(), torch.ones(3)) and not opt.state, value
    assert (opt.skipped_total, opt.skipped_in_a_row, opt.last_skipped) == (3, 3, True)
    norm[0] = 1.7
    opt.step()
    opt.record(not opt.overflow)
    assert not opt.overflow and (w.detach() < 1).all()
    assert (opt.skipped_total, opt.skipped_in_a_row, opt.last_skipped) == (3, 0, False)
    opt.grad_norm = None
    w.grad = torch.full((3,), float("nan"))
    opt.step()
    assert not opt.overflow and torch.isnan(w.detach()).all()


def test_every_process_group_takes_the_recipes_timeout(tp1):
    """set_group_timeouts reaches groups made without a timeout (torch's default for new groups is not the
    default group's), and the recipe's minutes are what setup and build_engine use."""
    import datetime

    import torch.distributed as dist

    from sedd_scale.distributed import engine, parallel

    late = dist.new_group([0])  # as DeepSpeed makes its groups: no timeout given
    assert parallel.group_timeout(late) == dist.distributed_c10d._get_default_timeout("gloo").total_seconds()
    default = parallel.group_timeout(dist.group.WORLD)
    try:
        parallel.set_group_timeouts(7 * 60)
        timeouts = parallel.group_timeouts()
        assert len(timeouts) >= 2 and set(timeouts) == {420.0}
    finally:
        parallel.set_group_timeouts(default)
    assert engine.timeout_s(toy_recipe(1, 1, 0)) == TIMEOUT_MIN * 60 == datetime.timedelta(minutes=3).total_seconds()


def test_tf32_flags():
    """enable_tf32 (called at start on CUDA) sets torch 2.4's flags, which newer torch maps onto fp32_precision."""
    from sedd_scale.distributed.engine import enable_tf32

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        enable_tf32()
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9: CUDA only, CPU (oneDNN) untouched
            assert torch.backends.cuda.matmul.fp32_precision == "tf32"
            assert torch.backends.mkldnn.matmul.fp32_precision == "none"
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_deepspeed_config():
    """The DeepSpeed config carries the layout's batch split, ZeRO stage, clipping and precision."""
    from sedd_scale.distributed.engine import deepspeed_config

    recipe = toy_recipe(1, 2, 1, "bf16")
    config = deepspeed_config(recipe, recipe.layout(4))
    assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"],
            config["gradient_accumulation_steps"]) == (GLOBAL, MICRO, 2)
    # DeepSpeed's pipeline engine refuses overlap_comm: the engine passes it off under PP
    assert config["zero_optimization"] == {"stage": 1, "overlap_comm": False, "contiguous_gradients": True,
                                           "reduce_bucket_size": 200_000_000}
    assert config["gradient_clipping"] == CLIP
    # bf16 under the pipeline engine accumulates in gradient hooks (the default leaves DeepSpeed's fp32 gradients 0)
    assert config["bf16"] == {"enabled": True, "immediate_grad_update": True}
    assert config["data_types"] == {"grad_accum_dtype": "fp32"}
    assert "optimizer" not in config  # the client passes a torch AdamW: nothing for DeepSpeed to compile
    assert config["zero_allow_untested_optimizer"] is True  # GuardedAdamW is not on DeepSpeed's exact-type list
    fp32 = deepspeed_config(toy_recipe(1, 1, 3), toy_recipe(1, 1, 3).layout(1))
    assert fp32["bf16"] == {"enabled": False} and "data_types" not in fp32 and fp32["gradient_accumulation_steps"] == 4
    assert fp32["zero_optimization"] == {"stage": 3, "overlap_comm": True, "contiguous_gradients": True,
                                         "reduce_bucket_size": 200_000_000, "stage3_prefetch_bucket_size": 50_000_000}
    keys = {"zero_overlap_comm": False, "zero_contiguous_gradients": False, "zero_reduce_bucket_size": 1000,
            "zero_prefetch_bucket_size": 0}
    for zero, want in ((0, {"stage": 0}),  # no ZeRO optimizer: DeepSpeed reads none of them
                       (2, {"stage": 2, "overlap_comm": False, "contiguous_gradients": False,
                            "reduce_bucket_size": 1000}),
                       (3, {"stage": 3, "overlap_comm": False, "contiguous_gradients": False,
                            "reduce_bucket_size": 1000, "stage3_prefetch_bucket_size": 0})):
        r = toy_recipe(1, 1, zero, parallel=keys)
        assert deepspeed_config(r, r.layout(2))["zero_optimization"] == want


def test_optimizer_groups_and_schedule():
    """Weight decay on matrices only; the scheduler follows OptimConfig.lr_at."""
    from sedd_scale.config import OptimConfig
    from sedd_scale.distributed.engine import build_optimizer

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    optim = OptimConfig(lr=1.0, warmup=4, weight_decay=0.1, schedule="cosine", min_lr=0.0)
    opt, sched = build_optimizer(model, optim, total_steps=8)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
    assert decayed == {id(model[0].weight)}
    assert sum(len(g["params"]) for g in opt.param_groups) == 4
    lrs = []
    for _ in range(9):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([optim.lr_at(s, 8) for s in range(9)])
    assert lrs[:5] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0]) and lrs[-1] == pytest.approx(0.0)
