"""The parallel layout and all batch arithmetic: world = TP x CP x PP x DP, global batch = micro x DP x grad accum,
and which global rows a rank's micro-batch holds (Megatron's convention). Pure arithmetic, imported by the
recipe, the data loaders, the trainer and the planner alike, so they cannot disagree.

Context parallelism (CP) splits each sequence's positions over CP ranks, which all hold the same rows: the data,
the noise and the batch arithmetic follow the pure DP rank, while DeepSpeed partitions (ZeRO) and averages
gradients over its data group, which is DP x CP."""
from __future__ import annotations

import math
from dataclasses import dataclass, field


def divisors(n: int) -> list[int]:
    """The positive divisors of n, ascending."""
    return [d for d in range(1, n + 1) if n % d == 0]


def check_zero_with_pipeline(zero_stage: int, pp: int) -> None:
    """DeepSpeed's pipeline engine runs ZeRO-0 or 1 only; refuse other stages before any process starts."""
    if pp > 1 and zero_stage > 1:
        raise ValueError(f"zero_stage {zero_stage} with pp={pp}: DeepSpeed's pipeline engine supports ZeRO-1 only "
                         "(ZeRO-2/3 partition gradients/parameters, which its schedule does not handle): "
                         "use zero_stage 1 or pp 1")


def row_offset(micro: int, dp_rank: int, micro_batch: int, dp: int) -> int:
    """First global row (within a step's global batch) of DP rank `dp_rank`'s micro-batch `micro`:
    micro * micro_batch * dp + dp_rank * micro_batch (Megatron's convention; data and noise follow it)."""
    return micro * micro_batch * dp + dp_rank * micro_batch


def shard_bounds(numel: int, dp_rank: int, dp_size: int) -> tuple[int, int]:
    """[start, end) of the elements of a flattened tensor of `numel` that DP rank `dp_rank` holds: ceil(n / DP) each
    (ZeRO-3's rule; the EMA is sharded by it)."""
    c = math.ceil(numel / dp_size)
    return min(numel, dp_rank * c), min(numel, (dp_rank + 1) * c)


# What a checkpoint's recorded layout means by a key it lacks (checkpoints written before context parallelism).
SAVED_DEFAULTS = {"cp": 1}


def layout_changes(saved: dict, now: dict) -> dict[str, tuple]:
    """{key: (saved, now)} where two recorded layouts (`Layout.as_dict`) differ; a key missing from one holds its
    `SAVED_DEFAULTS` value (an older checkpoint has no cp: it ran CP 1)."""
    keys = [*now, *(k for k in saved if k not in now)]
    get = [{**SAVED_DEFAULTS, **d} for d in (saved, now)]
    return {k: (get[0].get(k), get[1].get(k)) for k in keys if get[0].get(k) != get[1].get(k)}


def reshard_args(layout: dict) -> str:
    """The layout options of `convert_checkpoint.py reshard` that write a checkpoint for `layout` (`as_dict`)."""
    cp = f" --cp {layout['cp']}" if layout.get("cp", 1) > 1 else ""
    return (f"--tp {layout.get('tp')}{cp} --pp {layout.get('pp')} --dp {layout.get('dp')} "
            f"--zero-stage {layout.get('zero_stage')}")


@dataclass(frozen=True)
class Layout:
    """A resolved parallel layout: world = tp * cp * pp * dp; global batch = micro * dp * grad_accum (CP ranks
    share their DP rank's rows). `cp` and `sp` (megatron sequence parallelism in the TP group) are keyword-only, so
    positional construction (the planner's `Candidate`) stays as it was."""

    world_size: int
    tp: int
    pp: int
    dp: int
    zero_stage: int
    micro_batch: int
    global_batch: int
    grad_accum: int
    cp: int = field(default=1, kw_only=True)
    sp: bool = field(default=False, kw_only=True)

    def __post_init__(self):
        if self.cp < 1:
            raise ValueError(f"context-parallel size must be >= 1, got {self.cp}")
        if self.sp and self.tp == 1:
            raise ValueError("sequence parallelism splits activations over the tensor-parallel group: it needs tp > 1")
        if self.tp * self.cp * self.pp * self.dp != self.world_size:
            raise ValueError(f"tp*cp*pp*dp = {self.tp}*{self.cp}*{self.pp}*{self.dp} != world size {self.world_size}")
        if self.micro_batch * self.dp * self.grad_accum != self.global_batch:
            raise ValueError(f"micro*dp*grad_accum = {self.micro_batch}*{self.dp}*{self.grad_accum} "
                             f"!= global batch {self.global_batch}")
        check_zero_with_pipeline(self.zero_stage, self.pp)

    @classmethod
    def resolve(cls, world_size: int, *, tp: int, pp: int, zero_stage: int, micro_batch: int,
                global_batch: int, cp: int = 1, sp: bool = False) -> "Layout":
        """DP and gradient accumulation for `world_size` ranks; ValueError naming the fix if impossible."""
        model = tp * cp * pp
        if world_size < 1 or world_size % model:
            names = "tp*cp*pp" if cp > 1 else "tp*pp"
            sizes = f"{tp}*{cp}*{pp}" if cp > 1 else f"{tp}*{pp}"
            raise ValueError(f"world size {world_size} is not divisible by {names} = {sizes} = {model}: "
                             f"launch a multiple of {model} processes or change parallel.tp/pp"
                             f"{'/context_parallel' if cp > 1 else ''}")
        dp = world_size // model
        if global_batch % (micro_batch * dp):
            raise ValueError(f"parallel.global_batch={global_batch} is not divisible by micro_batch*dp = "
                             f"{micro_batch}*{dp} = {micro_batch * dp}: change global_batch or micro_batch")
        return cls(world_size, tp, pp, dp, zero_stage, micro_batch, global_batch, global_batch // (micro_batch * dp),
                   cp=cp, sp=sp)

    @property
    def data_group_size(self) -> int:
        """The size of DeepSpeed's data group (ZeRO partitions and gradient averaging): DP x CP."""
        return self.dp * self.cp

    def row_offset(self, micro: int, dp_rank: int) -> int:
        """First global row of DP rank `dp_rank`'s micro-batch `micro` (see `row_offset`)."""
        return row_offset(micro, dp_rank, self.micro_batch, self.dp)

    def as_dict(self) -> dict:
        """What a checkpoint must match to be resumed without resharding; compare two with `layout_changes`. cp only
        when > 1, so a CP-1 checkpoint records what older versions wrote and read. Sequence parallelism is not in
        it: it shards no parameter or optimizer state."""
        return {"tp": self.tp, **({"cp": self.cp} if self.cp > 1 else {}), "pp": self.pp, "dp": self.dp,
                "zero_stage": self.zero_stage}

    def describe(self) -> str:
        """One line for logs and the launcher."""
        tp = f"TP {self.tp}{' (+SP)' if self.sp else ''}"
        cp = f" x CP {self.cp}" if self.cp > 1 else ""
        zero = f" over DP x CP {self.data_group_size}" if self.cp > 1 else ""
        return (f"world {self.world_size} = {tp}{cp} x PP {self.pp} x DP {self.dp} | ZeRO-{self.zero_stage}{zero} | "
                f"batch {self.global_batch} = micro {self.micro_batch} x DP {self.dp} x grad accum {self.grad_accum}")
