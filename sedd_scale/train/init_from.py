"""Starting a run from trained weights (`checkpoint.init_from`): a consolidated or hub directory is loaded into the
run's own layout (any TP/PP/DP/ZeRO) at step 0 with a fresh optimizer and the EMA set to the loaded weights, e.g.
to fine-tune a pretrained model on prompt/response pairs.

The directory's model must be the recipe's: the fields that shape or define the network (`ARCHITECTURE`) are
compared, and a difference is refused naming each field. Numerics and regularisation (precision, dropout,
vocabulary padding, compile, the training length) may differ. A run directory that already holds a checkpoint is
resumed instead (`train/main.py`): init_from only says where a fresh run starts.
"""
from __future__ import annotations

from pathlib import Path

from sedd_scale.checkpoint import consolidated
from sedd_scale.checkpoint.hub import HubFormatError, model_config_from_hub, read_hub_config
from sedd_scale.model.config import ModelConfig

# The ModelConfig fields a loaded model must share with the recipe's.
ARCHITECTURE = ("hidden_size", "n_heads", "n_blocks", "cond_dim", "mlp_ratio", "num_tokens", "graph",
                "scale_by_sigma", "rotary_base")


class InitFromError(ValueError):
    """checkpoint.init_from names something a run cannot start from."""


def weights_config(path: str | Path) -> ModelConfig:
    """The model config of the consolidated or hub directory `path` (its config only: no tensor is read)."""
    path = Path(path)
    if not path.is_dir():
        raise InitFromError(f"checkpoint.init_from={path} is not a directory: name a consolidated directory "
                            "(tools/convert_checkpoint.py consolidate RUN OUT --weights ema) or a hub directory")
    if (path / "meta.json").is_file() or (path / "latest").is_file():
        raise InitFromError(f"checkpoint.init_from={path} is a sharded training checkpoint: consolidate it first "
                            f"(python tools/convert_checkpoint.py consolidate {path} OUT --weights ema) and name OUT")
    if not (path / "config.json").is_file():
        raise InitFromError(f"checkpoint.init_from={path} holds no config.json: it is not a consolidated or hub "
                            "directory (tools/convert_checkpoint.py consolidate / to-hub write one)")
    try:
        if consolidated.is_consolidated(path):
            return consolidated.open_consolidated(path, verify=False).model
        return model_config_from_hub(read_hub_config(path))
    except (consolidated.ConsolidatedError, HubFormatError, ValueError) as e:
        raise InitFromError(f"checkpoint.init_from={path}: {e}") from None


def check_same_model(loaded: ModelConfig, model: ModelConfig, path: str | Path) -> None:
    """InitFromError (one line naming every differing field) unless `loaded` has `model`'s architecture."""
    diff = [f"model.{k}: checkpoint {getattr(loaded, k)!r}, recipe {getattr(model, k)!r}" for k in ARCHITECTURE
            if getattr(loaded, k) != getattr(model, k)]
    if diff:
        raise InitFromError(f"checkpoint.init_from={path} holds another model ({'; '.join(diff)}): set the recipe's "
                            "model to the checkpoint's")


def check_init_from(path: str | Path, model: ModelConfig) -> None:
    """The pre-flight check of a fresh run's init_from: a loadable directory holding the recipe's model."""
    check_same_model(weights_config(path), model, path)


def load_init_weights(trainer, path: str | Path) -> str:
    """Set `trainer`'s weights (and EMA) from the directory `path` (every rank reads the tensors it holds; checked
    against the recipe's model first); the optimizer stays fresh and the step 0. Returns a line for the log."""
    from sedd_scale.checkpoint import full_state
    from sedd_scale.pretrained import read_weights

    check_init_from(path, trainer.model_cfg)
    weights = read_weights(path)
    if trainer.step != 0:
        raise InitFromError(f"checkpoint.init_from loads weights into a fresh run, this one is at step {trainer.step}")
    full_state.load(trainer, {"weights": weights.tensors}, None)
    source = f" (step {weights.step} of its run)" if weights.step is not None else ""
    return (f"started from the weights of {path}{source}: step 0, a fresh optimizer, the EMA set to these weights "
            "(checkpoint.init_from)")
