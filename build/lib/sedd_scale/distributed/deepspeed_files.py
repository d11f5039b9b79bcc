"""DeepSpeed's conventions in one place: the names of its checkpoint files, how its pipeline engine names
parameters, and how a ZeRO-partitioned parameter is recognised. Everything that reads DeepSpeed's state
(the EMA, the live full state, offline conversion, the step runners) asks here."""
from __future__ import annotations

from torch import Tensor

FOLDER = "deepspeed"  # the tag our checkpoints save DeepSpeed's files under


def model_states(mp: int) -> str:
    """Weights (and, without ZeRO, torch's optimizer state) of model-parallel rank `mp`."""
    return f"{FOLDER}/mp_rank_{mp:02d}_model_states.pt"


def zero_model_states(dp: int, mp: int) -> str:
    """ZeRO-3's per-rank module state (its `param_shapes`)."""
    return f"{FOLDER}/zero_pp_rank_{dp}_mp_rank_{mp:02d}_model_states.pt"


def optim_states(dp: int, mp: int, bf16: bool = False) -> str:
    """ZeRO's (or the bf16 optimizer's) flat partitions of DP rank `dp`, model-parallel rank `mp`."""
    return f"{FOLDER}/{'bf16_zero' if bf16 else 'zero'}_pp_rank_{dp}_mp_rank_{mp:02d}_optim_states.pt"


def layer_states(index: int, tp: int) -> str:
    """A pipeline layer's weights (layers are numbered: 0 input, 1..n blocks, n + 1 output)."""
    return f"{FOLDER}/layer_{index:02d}-model_{tp:02d}-model_states.pt"


def model_key(name: str, n_blocks: int, pipelined: bool) -> str:
    """Our model key (the TP=1 `SEDD` parameter name) of a parameter named `name` by DeepSpeed."""
    if not pipelined:
        return name.removeprefix("model.")
    index, rest = name.split(".", 1)  # a PipelineModule names parameters by their layer's index
    i = int(index)
    if i == 0:
        return f"input_layer.{rest}"
    return f"output_layer.{rest}" if i == n_blocks + 1 else f"blocks.{i - 1}.{rest}"


def zero3_partitioned(p: Tensor) -> bool:
    """A ZeRO-3 parameter: its data lives in its own DP partition (`p.ds_tensor`), its shape in `p.ds_shape`."""
    return hasattr(p, "ds_tensor")


def zero_fragmented(p: Tensor) -> bool:
    """ZeRO-1/2 or the bf16 optimizer: the parameter's fp32 state lives in flat partitions (`p._hp_mapping`)."""
    return hasattr(p, "_hp_mapping")
