"""The parallel layout and all batch arithmetic: world = TP x PP x DP, global batch = micro x DP x grad accum,
and which global rows a rank's micro-batch holds (Megatron's convention). Pure arithmetic, imported by the
recipe, the data loaders, the trainer and the planner alike, so they cannot disagree."""
from __future__ import annotations

import math
from dataclasses import dataclass


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
        check_zero_with_pipeline(self.zero_stage, self.pp)

    @classmethod
    def resolve(cls, world_size: int, *, tp: int, pp: int, zero_stage: int, micro_batch: int,
                global_batch: int) -> "Layout":
        """DP and gradient accumulation for `world_size` ranks; ValueError naming the fix if impossible."""
        if world_size < 1 or world_size % (tp * pp):
            raise ValueError(f"world size {world_size} is not divisible by tp*pp = {tp}*{pp} = {tp * pp}: "
                             f"launch a multiple of {tp * pp} processes or change parallel.tp/pp")
        dp = world_size // (tp * pp)
        if global_batch % (micro_batch * dp):
            raise ValueError(f"parallel.global_batch={global_batch} is not divisible by micro_batch*dp = "
                             f"{micro_batch}*{dp} = {micro_batch * dp}: change global_batch or micro_batch")
        return cls(world_size, tp, pp, dp, zero_stage, micro_batch, global_batch, global_batch // (micro_batch * dp))

    def row_offset(self, micro: int, dp_rank: int) -> int:
        """First global row of DP rank `dp_rank`'s micro-batch `micro` (see `row_offset`)."""
        return row_offset(micro, dp_rank, self.micro_batch, self.dp)

    def as_dict(self) -> dict:
        """What a checkpoint must match to be resumed without resharding."""
        return {"tp": self.tp, "pp": self.pp, "dp": self.dp, "zero_stage": self.zero_stage}

    def describe(self) -> str:
        """One line for logs and the launcher."""
        return (f"world {self.world_size} = TP {self.tp} x PP {self.pp} x DP {self.dp} | ZeRO-{self.zero_stage} | "
                f"batch {self.global_batch} = micro {self.micro_batch} x DP {self.dp} x grad accum {self.grad_accum}")
