"""Exact resume: where training stands, and the checkpoint files it can be resumed from.

Files in the output folder (all written atomically: a temporary file beside them takes their place,
so a kill while writing leaves the previous version intact):

* ``last.ckpt`` (:class:`EpochEndCheckpoint`): the state at the end of the last completed epoch,
  which is the end of the run once training has finished, whatever the validation interval;
* ``last_step.ckpt`` (:class:`StepCheckpoint`, ``--save_every_n_steps N``): the state after the
  most recent multiple of N optimizer steps (mid-epoch; after the validation run at that step, if
  any). It may be older than ``last.ckpt`` just after an epoch ends: resume from the one with the
  larger ``global_step``;
* the best checkpoint by ``val_acc`` (Lightning's ``ModelCheckpoint``, ``epoch=E-step=S.ckpt``).

Resuming from any of them continues with the same batches, augmentations, dropout masks and
optimizer state as the uninterrupted run: ``data.EpochSampler`` skips the batches of the resumed
epoch already trained on (:func:`training_position`), and ``train_val.Trainer`` saves and restores
the global random generators (``utils.seeding``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Tuple, Union

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Checkpoint

PathLike = Union[str, os.PathLike]

LAST_CHECKPOINT = "last.ckpt"
STEP_CHECKPOINT = "last_step.ckpt"


def training_position(trainer: Optional[pl.Trainer]) -> Tuple[int, int]:
    """``(epoch, batches of that epoch already trained)`` where training (re)starts, read from
    Lightning's progress counters (restored from the checkpoint before the training DataLoader is
    built). ``(0, 0)`` without a trainer."""
    if trainer is None:
        return 0, 0
    fit_loop = trainer.fit_loop
    epochs = fit_loop.epoch_progress.current
    epoch = int(epochs.processed)
    if epochs.started > epochs.processed:  # the checkpoint was written inside this epoch
        return epoch, int(fit_loop.epoch_loop.batch_progress.current.ready)
    return epoch, 0


def save_checkpoint_atomically(trainer: pl.Trainer, path: PathLike) -> None:
    """``trainer.save_checkpoint(path)`` through a temporary file beside ``path`` (call it on every
    process, as ``trainer.save_checkpoint`` requires)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    trainer.save_checkpoint(tmp, weights_only=False)  # the full training state
    if trainer.is_global_zero:
        os.replace(tmp, path)
    trainer.strategy.barrier("save_checkpoint_atomically")


class EpochEndCheckpoint(Checkpoint):
    """Writes ``<dirpath>/last.ckpt`` at the end of every training epoch (after the validation of
    the epoch's last step and the other checkpoint callbacks listed before it)."""

    def __init__(self, dirpath: PathLike, filename: str = LAST_CHECKPOINT):
        self.path = Path(dirpath) / filename

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.fast_dev_run or trainer.sanity_checking:
            return
        save_checkpoint_atomically(trainer, self.path)


class StepCheckpoint(Checkpoint):
    """Writes ``<dirpath>/last_step.ckpt`` every ``every_n_steps`` optimizer steps.

    It is written at the end of the step's batch and, when validation runs right after that batch,
    again after the validation (with its results), so that a resume neither repeats nor loses it.
    """

    def __init__(self, dirpath: PathLike, every_n_steps: int, filename: str = STEP_CHECKPOINT):
        if int(every_n_steps) < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.path = Path(dirpath) / filename
        self.every_n_steps = int(every_n_steps)
        self._saved_step = -1

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs,
                           batch, batch_idx: int) -> None:
        step = trainer.global_step
        if trainer.fast_dev_run or step == 0 or step % self.every_n_steps or step == self._saved_step:
            return
        save_checkpoint_atomically(trainer, self.path)
        self._saved_step = step

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (trainer.sanity_checking or trainer.state.fn != "fit"
                or trainer.global_step != self._saved_step):
            return
        save_checkpoint_atomically(trainer, self.path)
