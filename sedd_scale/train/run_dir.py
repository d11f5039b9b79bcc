"""What a run may do with its checkpoint directory, decided before any process group starts.

* A directory with checkpoints is resumed: the saved recipe is compared with the current one key by
  key (`recipe_changes.check_resume`); changes it cannot apply are refused here, naming each key.
* Without a checkpoint, a run starts from scratch, or from `checkpoint.init_from`'s weights (checked here: a
  consolidated or hub directory holding the recipe's model); with one, it resumes and init_from is not used.
* `checkpoint.resume: false` in a directory with checkpoints is refused unless
  `checkpoint.start_over: true` says to discard them (`start_over`, done by rank 0 under the run lock).

`python -m sedd_scale.train.run_dir RECIPE --world-size N [--set k=v ...]` is the launcher's pre-flight:
it prints the layout and what a resume would change, or the reason the run cannot start (exit 2).
"""
from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from sedd_scale.checkpoint.sharded import LATEST, SET_ASIDE, CheckpointDir, CheckpointError, read_meta, set_aside_for
from sedd_scale.config import Recipe, RecipeError, add_recipe_args, from_dict, load_recipe, overrides_from_args, to_dict
from sedd_scale.config.changes import Change, ResumeRefused, check_resume
from sedd_scale.train.init_from import InitFromError, check_init_from
from sedd_scale.train.wandb_sink import check_available as check_wandb


@dataclass
class RunStart:
    """How the run starts: from `latest` (None: from scratch), applying `changes` to the saved recipe."""

    latest: Path | None
    changes: list[Change]
    start_over: bool = False
    init_from: str | None = None  # checkpoint.init_from: the weights a fresh run starts from (unused on resume)

    def describe(self) -> list[str]:
        """Lines for the log."""
        if self.latest is None:
            origin = f"from the weights of {self.init_from}" if self.init_from else "from scratch"
            return [f"start: {origin}" + (" (the directory's old checkpoints are discarded)" if self.start_over
                                          else "")]
        where = str(self.latest)
        if self.latest.name.startswith(SET_ASIDE):
            where = (f"{self.latest.parent / set_aside_for(self.latest)} (put back from {self.latest}, where an "
                     "interrupted re-save left it)")
        unused = ([f"  checkpoint.init_from={self.init_from} is not used: the run resumes its own checkpoint"]
                  if self.init_from else [])
        return [f"resume: {where}"] + [f"  applied from this recipe: {c.describe()}" for c in self.changes] + unused


def _has_checkpoints(ckpts: CheckpointDir) -> bool:
    return (ckpts.root / LATEST).exists() or bool(ckpts.steps())


def _init_from(recipe: Recipe) -> str | None:
    """checkpoint.init_from of a fresh run, checked (a loadable directory holding the recipe's model)."""
    path = recipe.checkpoint.init_from
    if path is not None:
        try:
            check_init_from(path, recipe.model)
        except InitFromError as e:
            raise RecipeError(str(e)) from None
    return path


def check_start(recipe: Recipe, world_size: int) -> RunStart:
    """The start of a run of `recipe` on `world_size` ranks; RecipeError / ResumeRefused / CheckpointError when
    it must not start (nothing is touched either way)."""
    layout = recipe.layout(world_size)
    ckpts = CheckpointDir(recipe.checkpoint.dir)
    if not recipe.checkpoint.resume:
        if _has_checkpoints(ckpts) and not recipe.checkpoint.start_over:
            raise RecipeError(f"checkpoint.resume is false but {ckpts.root} holds checkpoints of a run: resume it "
                              "(checkpoint.resume=true), choose a new checkpoint.dir, or set "
                              "checkpoint.start_over=true to delete them and start again")
        return RunStart(None, [], start_over=_has_checkpoints(ckpts), init_from=_init_from(recipe))
    latest = ckpts.latest(set_aside_ok=True)  # an interrupted re-save's copy: read there, put back at the start
    if latest is None:
        if ckpts.steps():
            raise CheckpointError(f"{ckpts.root} holds step folders but no `latest` pointer: write the name of the "
                                  f"one to resume into {ckpts.root / LATEST} (e.g. {ckpts.steps()[-1].name})")
        return RunStart(None, [], init_from=_init_from(recipe))
    meta = read_meta(latest)
    try:
        saved = from_dict(Recipe, meta["recipe"])
    except RecipeError as e:
        raise CheckpointError(f"the recipe saved in {latest / 'meta.json'} is not valid for this version ({e}): "
                              "continue the run with the version that wrote it, or start a new run") from None
    changes = check_resume(to_dict(saved), to_dict(recipe), meta["layout"], layout.as_dict(), checkpoint=str(latest),
                           run_dir=str(ckpts.root))
    return RunStart(latest, changes, init_from=recipe.checkpoint.init_from)


def start_over(root: str | Path) -> list[Path]:
    """Delete a run's checkpoints (step folders, diverged ones, staging leftovers, the pointer); rank 0, locked."""
    root = Path(root)
    doomed = sorted([*root.glob("step_*"), *root.glob("diverged-step_*"), *root.glob(".tmp-*")])
    for path in doomed:
        shutil.rmtree(path)
    (root / LATEST).unlink(missing_ok=True)
    return doomed


def main(argv: list[str] | None = None) -> int:
    """The launcher's pre-flight: layout and run-directory checks, nothing started."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_recipe_args(parser)
    parser.add_argument("--world-size", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, overrides_from_args(args))
        layout = recipe.layout(args.world_size)
        start = check_start(recipe, args.world_size)
        check_wandb(recipe.train.wandb)
    except (RecipeError, ResumeRefused, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"layout: {layout.describe()}")
    print("\n".join(start.describe()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
