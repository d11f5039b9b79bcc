"""GPUs, DeepSpeed's defaults the estimates follow, and the assumptions beyond the recipe."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

GB = 1e9  # memory is printed in decimal GB, the unit GPU memory is sold in


@dataclass(frozen=True)
class Gpu:
    """A GPU model: dense peak rates (TFLOP/s) and memory (bytes)."""

    name: str
    bf16_tflops: float  # dense bf16 tensor-core peak
    tf32_tflops: float  # dense TF32 tensor-core peak: fp32 recipes (engine.enable_tf32 turns TF32 on for CUDA GEMMs)
    memory_bytes: float


GPUS: dict[str, Gpu] = {  # NVIDIA datasheet figures
    "h100": Gpu("H100 SXM", 989.0, 494.5, 80 * GB),
    "a100": Gpu("A100 SXM 80GB", 312.0, 156.0, 80 * GB),
    "h200": Gpu("H200 SXM", 989.0, 494.5, 141 * GB),
}
DEFAULT_GPU = "h100"

# DeepSpeed 0.19's ZeRO defaults, which engine.deepspeed_config leaves alone (a test checks both); the reduce and
# prefetch buckets and overlap_comm are the recipe's (parallel.zero_*), read by the estimates as the engine passes them.
# Elements of the engine's own gradient all-reduce (ZeRO-0 and BF16_Optimizer): MEMORY_OPT_ALLREDUCE_SIZE.
ALLREDUCE_BUCKET_SIZE = 500_000_000
PARAM_PERSISTENCE_THRESHOLD = 100_000  # stage3_param_persistence_threshold: smaller params stay whole
MAX_LIVE_PARAMETERS = 1_000_000_000  # stage3_max_live_parameters: gathered ZeRO-3 params at once
# The fused loss's chunk: as many tokens as 64 MiB of fp32 logits hold (HeadLossConfig.chunk_bytes, which
# pipeline.head_loss_config keeps; a test checks both).
LOSS_CHUNK_BYTES = 64 * 2**20
# Minutes torch.compile takes for one pipeline stage's regions (each block's elementwise work and the
# fused loss's chunk): an estimate, low and high. Every stage compiles them before the first pipeline
# transfer (distributed.runner.warm_up_stage), all stages at once, so a stage waits for the slowest one's
# compile, not for the sum along the pipeline (3-6 min at PP 8, 6-24 min at PP 16-32 when compiled lazily).
COMPILE_MINUTES_PER_STAGE = (0.375, 0.75)


@dataclass(frozen=True)
class Assumptions:
    """What the estimates assume beyond the recipe (printed with every plan)."""

    efficiency: float = 0.5  # fraction of the peak rate the matmuls sustain
    gpus_per_node: int = 8
    intra_node_gbps: float = 300.0  # NCCL bus bandwidth inside a node (NVLink through NVSwitch), GB/s per GPU
    inter_node_gbps: float = 400.0  # a node's network, GB/s per direction: 8 x 400 Gb/s InfiniBand = 400 GB/s
    block_overhead_s: float = 1e-4  # launch and framework time per block per micro-batch (forward + backward)
    reserve_bytes: float = 2.5 * GB  # CUDA context and NCCL buffers, per GPU
    fragmentation: float = 0.05  # allocator slack on top of the tensor peak
    device: Literal["cuda", "cpu"] = "cuda"  # cpu: the kernels of the validation runs (dropout masks)

    def __post_init__(self):
        if not 0.0 < self.efficiency <= 1.0:
            raise ValueError(f"efficiency must be in (0, 1], got {self.efficiency}")
        if self.gpus_per_node < 1:
            raise ValueError(f"gpus_per_node must be >= 1, got {self.gpus_per_node}")
        if not (self.intra_node_gbps > 0 and self.inter_node_gbps > 0):
            raise ValueError(f"bandwidths must be > 0 GB/s, got intra-node {self.intra_node_gbps}, inter-node "
                             f"{self.inter_node_gbps}")
