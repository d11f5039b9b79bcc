"""Recipes: typed, validated dataclass configs read from YAML (`recipe.py`), the YAML rules (`yaml_loader.py`),
dict <-> dataclass conversion (`typed.py`), what a resume may change (`changes.py`) and the pre-flight CLI
(`python -m sedd_scale.config`, `cli.py`)."""
from sedd_scale.config.recipe import (
                                      CheckpointConfig,
                                      DataConfig,
                                      DiffusionConfig,
                                      OptimConfig,
                                      ParallelConfig,
                                      Recipe,
                                      TrainConfig,
                                      add_recipe_args,
                                      load_recipe,
                                      overrides_from_args,
)
from sedd_scale.config.typed import from_dict, to_dict
from sedd_scale.config.yaml_loader import RecipeError, apply_overrides, parse_yaml
from sedd_scale.layout import Layout

__all__ = [
    "CheckpointConfig", "DataConfig", "DiffusionConfig", "Layout", "OptimConfig", "ParallelConfig", "Recipe",
    "RecipeError", "TrainConfig", "add_recipe_args", "apply_overrides", "from_dict", "load_recipe",
    "overrides_from_args", "parse_yaml", "to_dict",
]
