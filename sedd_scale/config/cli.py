"""The pre-flight check: `python -m sedd_scale.config RECIPE --world-size N [--gpu G] [--propose]`.

The network the planner assumes: `--gpus-per-node`, `--intra-node-gbps`, `--inter-node-gbps`.
"""
from __future__ import annotations

import argparse
import sys

import yaml

from sedd_scale import plan as planner
from sedd_scale.config.recipe import RecipeError, add_recipe_args, load_recipe, overrides_from_args
from sedd_scale.config.typed import to_dict


def save_recipe(recipe, path: str) -> None:
    """Write `recipe` resolved (every key, defaults included) as YAML at `path`, which must not exist."""
    try:
        with open(path, "x", encoding="utf-8") as f:
            f.write(f"# written by `sedd-plan ... --save-recipe {path}`: every key, see docs/recipe-keys.md\n")
            yaml.safe_dump(to_dict(recipe), f, sort_keys=False)
    except FileExistsError:
        raise FileExistsError(f"{path} exists: choose another --save-recipe path (recipes are never overwritten)"
                              ) from None
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    """Validate a recipe and print its resolved layout for a world size with the layout planner's memory,
    bubble, time and MFU estimates (the launcher's pre-flight check); --propose lists the layouts that fit."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_recipe_args(parser)
    parser.add_argument("--world-size", type=int, default=1)
    parser.add_argument("--gpu", choices=sorted(planner.GPUS), default=None,
                        help=f"GPU to plan for (default {planner.DEFAULT_GPU}, with train.peak_tflops for MFU if set)")
    parser.add_argument("--propose", action="store_true",
                        help="also list the layouts that fit this world size, fastest first")
    parser.add_argument("--efficiency", type=float, default=planner.Assumptions.efficiency,
                        help="fraction of the peak FLOP rate the matmuls sustain (default %(default)s)")
    parser.add_argument("--gpus-per-node", type=int, default=planner.Assumptions.gpus_per_node,
                        help="GPUs per node (default %(default)s)")
    parser.add_argument("--intra-node-gbps", type=float, default=planner.Assumptions.intra_node_gbps,
                        help="NVLink bus bandwidth per GPU inside a node, GB/s (default %(default)s)")
    parser.add_argument("--inter-node-gbps", type=float, default=planner.Assumptions.inter_node_gbps,
                        help="network bandwidth per node and direction, GB/s (default %(default)s: 8 x 400 Gb/s)")
    parser.add_argument("--print-recipe", action="store_true", help="also print the resolved recipe as YAML")
    parser.add_argument("--save-recipe", metavar="PATH",
                        help="write the resolved recipe (--set applied, every key) as a new YAML file to train with")
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, overrides_from_args(args))
        if args.save_recipe:
            save_recipe(recipe, args.save_recipe)
        assumptions = planner.Assumptions(efficiency=args.efficiency, gpus_per_node=args.gpus_per_node,
                                          intra_node_gbps=args.intra_node_gbps, inter_node_gbps=args.inter_node_gbps)
    except (RecipeError, ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    gpu = planner.GPUS[args.gpu or planner.DEFAULT_GPU]
    peak = None if args.gpu else recipe.train.peak_tflops  # an explicit --gpu brings its own peak
    code = 0
    try:
        layout = recipe.layout(args.world_size)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        if not args.propose:
            return 2
        code = 2
    else:
        print(f"layout: {layout.describe()}")
        plan = planner.plan(recipe, planner.candidate_of(recipe, layout), gpu, assumptions, peak)
        print(planner.format_plan(recipe, plan))
    if args.propose:
        print(planner.format_batch_proposal(recipe, args.world_size, planner.propose_global_batch(
            recipe, args.world_size, gpu, assumptions, peak)))
        print(planner.format_proposals(recipe, args.world_size,
                                       planner.propose(recipe, args.world_size, gpu, assumptions, peak)))
    if args.print_recipe:
        print("---")
        print(yaml.safe_dump(to_dict(recipe), sort_keys=False), end="")
    return code


if __name__ == "__main__":
    sys.exit(main())
