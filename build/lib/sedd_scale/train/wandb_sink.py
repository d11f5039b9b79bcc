"""The optional Weights & Biases sink (recipe `train.wandb`): rank 0 logs the scalars tensorboard gets, at the same
steps, with the flattened recipe as the run's config. A resumed run continues the same W&B run: its id is kept in
the run directory (`wandb_run_id`)."""
from __future__ import annotations

import importlib.util
import math
import secrets
from pathlib import Path

from sedd_scale.config import RecipeError
from sedd_scale.config.recipe import WandbConfig

RUN_ID_FILE = "wandb_run_id"
INSTALL = "pip install 'sedd-scale[wandb]' (or pip install wandb)"


def check_available(cfg: WandbConfig) -> None:
    """RecipeError when `cfg` asks for W&B and the wandb package is not installed (checked with the recipe, before
    any process group)."""
    if cfg.enabled and importlib.util.find_spec("wandb") is None:
        raise RecipeError(f"train.wandb.project = {cfg.project!r} asks for Weights & Biases logging, but the wandb "
                          f"package is not installed: {INSTALL}, or remove train.wandb.project")


def run_id(run_dir: str | Path, *, resuming: bool) -> tuple[str, bool]:
    """(the W&B run id of this run directory, whether it continues an earlier W&B run).

    A resumed run takes the id kept in `run_dir`; a run starting at step 0 (a new run, or one started over)
    draws a new id and keeps it there: W&B drops steps below those a run already logged, so a start-over
    under the old id would log nothing until it passed the old run's last step."""
    path = Path(run_dir) / RUN_ID_FILE
    if resuming and path.is_file():
        kept = path.read_text(encoding="utf-8").strip()
        if kept:
            return kept, True
    new = secrets.token_hex(4)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(new + "\n", encoding="utf-8")
    tmp.replace(path)
    return new, False


class WandbSink:
    """One W&B run (rank 0 only: the caller builds it there). Non-finite values are left out, as tensorboard's are."""

    def __init__(self, cfg: WandbConfig, run_dir: str | Path, *, config: dict, start_step: int = 0):
        """`config`: the flattened recipe and layout; `start_step`: the step the run starts from (> 0: a resume)."""
        import wandb

        self.id, self.resumed = run_id(run_dir, resuming=start_step > 0)
        directory = Path(cfg.dir or run_dir)
        directory.mkdir(parents=True, exist_ok=True)
        # silent: wandb's banner lines would interleave with the trainer's; the one line below says where it goes
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name or Path(run_dir).resolve().name,
                              id=self.id, resume="allow", dir=str(directory), mode=cfg.mode, config=config,
                              settings=wandb.Settings(silent=True))
        if self.resumed:  # settings the resume applied from the current recipe replace the saved ones
            self.run.config.update(config, allow_val_change=True)
        # A resumed W&B run refuses steps below the last one it logged (a crash after the last checkpoint): the
        # replayed steps repeat the same values (the resume is exact), so they are left out instead of warned about.
        self.first_step = max(int(self.run.step or 0), start_step)
        mode = self.run.settings.mode
        where = self.run.url if mode == "online" else f"{directory}/wandb ({mode}; upload with `wandb sync`)"
        self.description = f"wandb: run {self.id}{' (resumed)' if self.resumed else ''} -> {where}"

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Log the finite `values` at `step`."""
        finite = {k: float(v) for k, v in values.items() if math.isfinite(float(v))}
        if finite and step >= self.first_step:
            self.run.log(finite, step=step)

    def text(self, step: int, tag: str, text: str) -> None:
        """Log a text (samples, resume notes) at `step`, as preformatted HTML."""
        import html

        import wandb

        if step >= self.first_step:
            self.run.log({tag: wandb.Html(f"<pre>{html.escape(text)}</pre>")}, step=step)

    def close(self) -> None:
        """Finish the run (offline: its files are complete; online: the upload is flushed)."""
        self.run.finish()
