"""Workarounds for megatron-core and DeepSpeed on a machine without CUDA (CPU torch, gloo).

Every other module imports megatron-core and DeepSpeed through this one, so the fixes are in
place before the first use. Each fix is applied only when its trigger is present:

1. megatron-core >= 0.19 imports `triton` unguarded in `transformer/moe/ops/paged_stash.py`
   (pulled in by the pipeline schedules). CPU wheels ship no triton, and a global fake `triton`
   breaks `torch._dynamo`, so only that MoE-only module is stubbed.
2. Without CUDA, megatron-core places buffers on `torch.cuda.current_device()`, seeds and forks
   its RNG tracker through `torch.cuda.{get_rng_state,manual_seed}` and sets states with a lazy
   CUDA call that silently never runs. They are mapped onto the CPU device and generator,
   which is what CPU tensors use anyway.
3. The pipeline schedules allocate `torch.zeros(..., device="cuda")`; that module gets a torch
   whose factory functions map "cuda" to "cpu".
4. DeepSpeed's CPU accelerator JIT-builds a shared-memory all-reduce op (about a minute on two
   cores) inside `init_distributed`; it only serves CPU inference, so the build is skipped.
5. megatron-core's linear autograd functions carry autocast into their backward with
   `custom_fwd/custom_bwd(device_type="cuda")`: under CPU autocast the backward would multiply a
   bf16 gradient by fp32 weights and fail. On CPU they are wrapped to do the same for "cpu".
6. Not CPU-specific, applied on every machine: megatron-core < 0.19's `tensor_parallel.mappings._reduce`
   all-reduces a `.contiguous()` copy but returns the original tensor, so a non-contiguous input
   (e.g. the expanded gradient of a sum reaching `copy_to_tensor_model_parallel_region`'s backward)
   is returned unreduced. It is replaced by the fixed function of 0.19.2 (the same code, returning
   the reduced copy). 0.17-0.18 (Python >= 3.12) were not checked; the fixed code is correct there too.

On a CUDA machine only fixes 1 (when triton is missing) and 6 (old megatron-core) can apply.

Because internals of both are patched here and their checkpoint files are read directly
(`checkpoint/offline.py`), torch, megatron-core and DeepSpeed are checked against the tested
ranges (`SUPPORTED`) at import: another version is refused with the fix, or, with
SEDD_ALLOW_UNTESTED=1, allowed with a warning.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import sys
import types

import torch

APPLIED: list[str] = []
# Tested ranges (pyproject.toml says the same): the CI runs megatron-core 0.16.1 and 0.19.2, DeepSpeed 0.19.
SUPPORTED = {"torch": ">=2.4", "megatron-core": ">=0.16.1,<0.20", "deepspeed": ">=0.16,<0.20"}


def check_versions(version=None) -> list[str]:
    """Refuse (ImportError naming the fix) installed versions outside SUPPORTED; returns the problems found.

    With SEDD_ALLOW_UNTESTED=1 they are printed as a warning instead. `version`: importlib.metadata.version
    (replaceable for tests).
    """
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    version = version or installed
    problems = []
    for name, spec in SUPPORTED.items():
        try:
            found = Version(version(name))
        except PackageNotFoundError:
            continue  # a missing package fails at its own import, with its own name
        if Version(found.base_version) not in SpecifierSet(spec):
            problems.append(f"{name} {found} (tested: {spec})")
    if problems:
        fix = " ".join(f"'{n}{s}'" for n, s in SUPPORTED.items())
        message = (f"sedd-scale is tested with {', '.join(f'{n}{s}' for n, s in SUPPORTED.items())}; installed: "
                   f"{'; '.join(problems)}. Install tested versions (pip install {fix}), or set "
                   "SEDD_ALLOW_UNTESTED=1 to run anyway (its checkpoint readers and CPU fixes may not fit)")
        if os.environ.get("SEDD_ALLOW_UNTESTED") != "1":
            raise ImportError(message)
        logging.getLogger(__name__).warning(message)
    return problems


def _stub_paged_stash() -> None:
    if importlib.util.find_spec("triton") is not None:
        return
    name = "megatron.core.transformer.moe.ops.paged_stash"
    spec = importlib.util.find_spec("megatron")  # a namespace package: finding it runs nothing
    roots = list(spec.submodule_search_locations or []) if spec else []
    if name in sys.modules or not any(
        os.path.exists(os.path.join(r, "core/transformer/moe/ops/paged_stash.py")) for r in roots
    ):
        return

    def unavailable(*args, **kwargs):
        raise RuntimeError("paged-stash triton kernels need CUDA and triton (stubbed by sedd_scale.compat)")

    stub = types.ModuleType(name)
    stub.GLOBAL_BLOCK_SIZE = 1024
    stub.paged_stash_copy_kernel = unavailable
    stub.paged_stash_pop_kernel = unavailable
    sys.modules[name] = stub
    APPLIED.append("megatron paged_stash stub")


class _CudaToCpuTorch:
    """A view of `torch` whose tensor factories turn device="cuda" into the CPU."""

    _FACTORIES = frozenset({"zeros", "ones", "empty", "full", "tensor", "arange", "rand", "randn"})

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        attr = getattr(self._real, name)
        if name not in self._FACTORIES:
            return attr

        def factory(*args, **kwargs):
            if str(kwargs.get("device", "")).startswith("cuda"):
                kwargs["device"] = "cpu"
            return attr(*args, **kwargs)

        return factory


def _cuda_to_cpu() -> None:
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.random.get_rng_state = torch.cuda.get_rng_state
    torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)
    torch.cuda.random.manual_seed = torch.cuda.manual_seed
    torch.cuda.synchronize = lambda device=None: None

    import megatron.core.pipeline_parallel.schedules as schedules
    import megatron.core.tensor_parallel.random as mrandom

    mrandom._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    # The tracker warns on every fork that the "CPU RNG changed inside the GPU RNG context":
    # on CPU both are the same generator by construction.
    logging.getLogger(mrandom.__name__).setLevel(logging.ERROR)
    schedules.torch = _CudaToCpuTorch(torch)
    APPLIED.append("cuda->cpu device and RNG shims")


def _skip_deepspeed_shm_build() -> None:
    if importlib.util.find_spec("deepspeed") is None:
        return
    importlib.import_module("deepspeed.comm.torch")
    # `deepspeed.comm.torch` as an attribute is the real torch module: patch through sys.modules.
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    APPLIED.append("deepspeed shm-op build skipped")


def _cpu_autocast_in_megatron_linears() -> None:
    import megatron.core.tensor_parallel.layers as layers

    for fn in (layers.LinearWithGradAccumulationAndAsyncCommunication, layers.LinearWithFrozenWeight):
        forward, backward = fn.forward, fn.backward

        def fwd(ctx, *args, _forward=forward):
            ctx.sedd_cpu_autocast = (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))
            return _forward(ctx, *args)

        def bwd(ctx, *grads, _backward=backward):
            enabled, dtype = ctx.sedd_cpu_autocast
            with torch.autocast("cpu", enabled=enabled, dtype=dtype):
                return _backward(ctx, *grads)

        fn.forward, fn.backward = staticmethod(fwd), staticmethod(bwd)
    APPLIED.append("cpu autocast in megatron linear backward")


def _fix_megatron_reduce() -> None:
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    try:
        if Version(version("megatron-core")) >= Version("0.19"):
            return
    except PackageNotFoundError:
        return
    import megatron.core.tensor_parallel.mappings as mappings

    def _reduce(input_, group):
        """All-reduce the input tensor across the model-parallel group (returns the reduced tensor)."""
        assert group is not None, "group should not be None"
        if group.size() == 1:
            return input_
        input_ = input_.contiguous()
        torch.distributed.all_reduce(input_, group=group)
        return input_

    mappings._reduce = _reduce  # the autograd functions look it up in the module at call time
    APPLIED.append("megatron-core _reduce fix")


def apply() -> list[str]:
    """Apply the fixes this machine needs (idempotent); returns their names."""
    if APPLIED:
        return APPLIED
    check_versions()
    _stub_paged_stash()
    if not torch.cuda.is_available():
        _cuda_to_cpu()
        _skip_deepspeed_shm_build()
        _cpu_autocast_in_megatron_linears()
    _fix_megatron_reduce()
    APPLIED.append("checked")
    return APPLIED


apply()
