"""AdamW's state in the two layouts this project trains with, and the conversion between them.

torch's AdamW counts steps per parameter (`state[p]["step"]`, a float tensor); apex's FusedAdam (and
DeepSpeed's) per parameter group (`group["step"]`, an int, absent before the first step). Both keep the
moments as `exp_avg` and `exp_avg_sq`. A checkpoint written by one and read by the other would lose the step
count (bias correction restarts at step 1, a large first update) or fail on a missing key, so every state
dict our optimizer saves says its layout (`LAYOUT_KEY`), states without the mark are recognised by where
their step is, and every load converts to the loading optimizer's layout.

Group keys that only one implementation has (torch's `fused`, apex's `bias_correction`, ...) are dropped
from a state converted away from it and taken from the loading optimizer's own groups (torch replaces a
group's settings wholesale with the saved ones on load).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from sedd_scale.checkpoint.sharded import CheckpointError

TORCH, APEX = "torch", "apex"
LAYOUT_KEY = "step_layout"  # in every optimizer state dict that optim.SkipGuard saves
MOMENTS = ("exp_avg", "exp_avg_sq")
OWN_GROUP_KEYS = {TORCH: ("amsgrad", "maximize", "foreach", "capturable", "differentiable", "fused",
                          "decoupled_weight_decay"),
                  APEX: ("bias_correction",)}


class OptimizerStateError(CheckpointError):
    """An optimizer state that cannot be read or converted (a resume refuses it on every rank alike)."""


def layout_of_class(cls: type) -> str:
    """Where an AdamW class keeps its step count: TORCH (torch's Adam/AdamW) or APEX (a FusedAdam, apex's or
    DeepSpeed's, which count per group)."""
    if issubclass(cls, (torch.optim.Adam, torch.optim.AdamW)):
        return TORCH
    if any(c.__name__ == "FusedAdam" for c in cls.__mro__):
        return APEX
    raise OptimizerStateError(f"{cls.__name__} is neither torch's AdamW nor a FusedAdam: its optimizer state layout "
                              "is unknown; use one of those (sedd_scale.accelerators.adam_class)")


def _parts(state_or_optimizer) -> tuple[Mapping, list[dict]]:
    """(state, param groups) of a state dict or of a live optimizer."""
    if isinstance(state_or_optimizer, Mapping):
        return state_or_optimizer["state"], state_or_optimizer["param_groups"]
    return state_or_optimizer.state, state_or_optimizer.param_groups


def detect(state_dict: Mapping) -> str | None:
    """The layout of an optimizer state dict: its mark, checked against its content, else where its step is;
    None for an unmarked state with no step yet (the same in both layouts)."""
    state, groups = _parts(state_dict)
    in_groups = any("step" in g for g in groups)
    in_params = any("step" in s for s in state.values())
    if in_groups and in_params:
        raise OptimizerStateError("the optimizer state keeps a step count both per group and per parameter: it was "
                                  "not written by one AdamW implementation; resume from another checkpoint")
    found = APEX if in_groups else TORCH if in_params else None
    marked = state_dict.get(LAYOUT_KEY)
    if marked is not None and marked not in OWN_GROUP_KEYS:
        raise OptimizerStateError(f"optimizer state marked {LAYOUT_KEY}={marked!r}, expected one of "
                                  f"{sorted(OWN_GROUP_KEYS)}")
    if marked is not None and found is not None and found != marked:
        raise OptimizerStateError(f"the optimizer state is marked {marked!r} but keeps its step the {found} way: "
                                  "the file is damaged; resume from another checkpoint")
    if found is None and any(any(m in s for m in MOMENTS) for s in state.values()):
        raise OptimizerStateError("the optimizer state has AdamW moments but no step count: bias correction cannot "
                                  "continue; resume from another checkpoint")
    return marked or found


def _number(step) -> float:
    return float(step.item() if isinstance(step, torch.Tensor) else step)


def _steps(state: Mapping, groups: Iterable[dict], layout: str | None) -> set[float]:
    if layout == APEX:
        return {_number(g["step"]) for g in groups if "step" in g}
    return {_number(s["step"]) for s in state.values() if "step" in s}


def step_count(state_or_optimizer) -> int:
    """The number of optimizer steps taken, from a state dict or a live optimizer of either layout (0 before
    the first); an error when groups or parameters disagree."""
    state, groups = _parts(state_or_optimizer)
    if isinstance(state_or_optimizer, Mapping):
        layout = detect(state_or_optimizer)
    else:
        layout = layout_of_class(type(state_or_optimizer))
    steps = _steps(state, groups, layout)
    if len(steps) > 1:
        raise OptimizerStateError(f"AdamW's step differs between parameters or groups ({sorted(steps)}): there is "
                                  "no one step count to carry")
    return int(steps.pop()) if steps else 0


def set_step(optimizer: torch.optim.Optimizer, step: int) -> None:
    """Set a live optimizer's step count (its parameters' states must exist when it keeps it per parameter)."""
    if layout_of_class(type(optimizer)) == APEX:
        for group in optimizer.param_groups:
            if step:
                group["step"] = int(step)
            else:
                group.pop("step", None)  # FusedAdam's state before its first step
        return
    for state in optimizer.state.values():
        state["step"].fill_(step)


def fresh_state(optimizer: torch.optim.Optimizer, p: torch.Tensor, group: dict) -> dict[str, torch.Tensor]:
    """What `optimizer` keeps for parameter `p` of `group` before its first step (zero moments; and a zero step
    where it counts per parameter: on the device when the group is fused or capturable, as torch does)."""
    state = {m: torch.zeros_like(p, dtype=torch.float32) for m in MOMENTS}
    if layout_of_class(type(optimizer)) == TORCH:
        on_device = bool(group.get("fused") or group.get("capturable"))
        state = {"step": torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu"), **state}
    return state


def convert(state_dict: Mapping, to: str, template_groups: list[dict] | None = None) -> dict[str, Any]:
    """`state_dict` (either layout) in layout `to`, marked; the input is left as it is (tensors are shared).

    `template_groups`: the loading optimizer's param groups, whose implementation-specific settings replace the
    other implementation's; without them a state converted to APEX gets FusedAdam's `bias_correction=True`.
    """
    if to not in OWN_GROUP_KEYS:
        raise OptimizerStateError(f"unknown optimizer state layout {to!r}, expected one of {sorted(OWN_GROUP_KEYS)}")
    source = detect(state_dict)
    state = {k: dict(v) for k, v in state_dict["state"].items()}
    groups = [dict(g) for g in state_dict["param_groups"]]
    if template_groups is not None and len(template_groups) != len(groups):
        raise OptimizerStateError(f"the optimizer state has {len(groups)} parameter groups, the optimizer loading "
                                  f"it {len(template_groups)}")
    for i, group in enumerate(groups):
        if source == APEX and to == TORCH:
            _group_step_to_params(group, state)
        elif source == TORCH and to == APEX:
            _param_steps_to_group(group, state, i)
        other = APEX if to == TORCH else TORCH
        for key in OWN_GROUP_KEYS[other]:
            group.pop(key, None)
        own = template_groups[i] if template_groups is not None else {"bias_correction": True} if to == APEX else {}
        for key in OWN_GROUP_KEYS[to]:
            if key in own and key not in group:
                group[key] = own[key]
    return {**{k: v for k, v in state_dict.items() if k not in ("state", "param_groups")},
            "state": state, "param_groups": groups, LAYOUT_KEY: to}


def _group_step_to_params(group: dict, state: dict) -> None:
    """apex -> torch: the group's step into each of its parameters' states."""
    if not group.get("bias_correction", True):
        raise OptimizerStateError("the optimizer state was trained without bias correction (FusedAdam "
                                  "bias_correction=False), which torch's AdamW cannot continue; resume with apex")
    step = group.pop("step", None)
    for pid in group["params"]:
        if pid in state and step is None:
            raise OptimizerStateError(f"parameter {pid} has AdamW moments but its group has no step count")
        if pid in state:
            state[pid]["step"] = torch.tensor(_number(step), dtype=torch.float32)


def _param_steps_to_group(group: dict, state: dict, index: int) -> None:
    """torch -> apex: the group's parameters' (equal) steps into the group."""
    steps = {_number(state[pid].pop("step")) for pid in group["params"] if pid in state and "step" in state[pid]}
    if len(steps) > 1:
        raise OptimizerStateError(f"parameter group {index} has parameters at different AdamW steps "
                                  f"({sorted(steps)}); FusedAdam keeps one step per group and cannot continue them")
    if steps:
        group["step"] = int(steps.pop())
