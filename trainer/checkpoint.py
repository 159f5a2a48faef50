"""Atomic checkpoints for ``transformers.Trainer``: a checkpoint appears whole or not at all.

``transformers`` writes ``OUTPUT_DIR/checkpoint-N`` in place, so a crash in the middle of a
save leaves a directory that looks like the newest checkpoint and cannot be resumed from.
Here every rank writes into ``OUTPUT_DIR/_checkpoint-staging/checkpoint-N``, which is synced to
disk and renamed to ``OUTPUT_DIR/checkpoint-N`` once complete.

``Trainer._save_checkpoint`` takes the checkpoint's path from ``Trainer._get_output_dir`` and
pushes to the Hub from inside the save; :class:`AtomicCheckpoints` overrides both while a save
is staged (``transformers`` has no public hook for either; ``tests/test_trainer.py`` checks
that the overridden methods keep their shape).
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from torch import nn
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

# ("_*" is also outside what push_to_hub uploads from OUTPUT_DIR.)
STAGING_DIR = "_checkpoint-staging"


class AtomicCheckpoints(Trainer):
    """A ``Trainer`` whose checkpoints are staged and renamed into place when complete.
    Subclasses add files of their own to a checkpoint in :meth:`save_extra`."""

    _staging_root: str | None = None  # set while a checkpoint is being staged

    def save_extra(self, checkpoint_dir: str) -> None:
        """Write this trainer's own files into the staged ``checkpoint_dir`` (every rank)."""

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        run_dir = self._get_output_dir(trial=trial)
        staging_root = os.path.join(run_dir, STAGING_DIR)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staged, final = os.path.join(staging_root, name), os.path.join(run_dir, name)
        if self.args.should_save:
            shutil.rmtree(staging_root, ignore_errors=True)  # what a crashed save left
        self.accelerator.wait_for_everyone()
        # Rotation inside the staging area is a no-op: it holds one checkpoint.
        self._staging_root = staging_root
        try:
            super()._save_checkpoint(model, trial)
            self.save_extra(staged)
        finally:
            self._staging_root = None
        self.accelerator.wait_for_everyone()  # every rank's files (RNG states, shards) are in
        if self.args.should_save:
            if self.state.best_model_checkpoint == staged:
                self.state.best_model_checkpoint = final
                self.state.save_to_json(os.path.join(staged, "trainer_state.json"))
            fsync_tree(staged)
            if os.path.isdir(final):  # the same step saved again
                shutil.rmtree(final)
            os.replace(staged, final)
            os.rmdir(staging_root)  # empty now: no leftover beside the checkpoints
            fsync_tree(run_dir, files=False)
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        if self.args.push_to_hub:
            self._push_from_checkpoint(final)
        self.accelerator.wait_for_everyone()

    def _get_output_dir(self, trial: Any) -> str:
        if self._staging_root is not None:
            return self._staging_root
        return super()._get_output_dir(trial)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # While staged, the push (it may upload in the background) waits for the final folder.
        if self._staging_root is None:
            super()._push_from_checkpoint(checkpoint_folder)


def fsync_tree(root: str, files: bool = True) -> None:
    """Flush ``root`` (its files too, with ``files``) to disk, so a renamed checkpoint
    survives a machine crash, not only a process crash."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames if files else ():
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if not files:
            break
