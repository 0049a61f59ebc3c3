"""The old home of the loops' pieces, now one module per concern; the names are re-exported here so
existing imports (``orchestrator.plan``, the CLI commands, ``bench/``) keep working. New code imports
from the module that owns the name:

- ``context.py``: ``RunContext``, ``setup_run``, ``prepare_model``, ``adam``, ``StepGuard``, ``TrainingError``
  (a run's set-up and the guard it carries)
- ``steps.py``: ``optimisation_step``, ``compute_loss``, ``epoch_losses``, ``progress`` (one step, an
  epoch's mean loss)
- ``batches.py``: ``epoch_lengths``, ``search_steps``, ``train_batches``, ``alpha_batches``, ``to_device``
  (the batch streams and their epoch lengths)
- ``tail.py``: ``EpochTail``, ``improves`` (validation, checkpoints and callbacks around each epoch)
- ``rundir.py``: ``guard_out_dir``, ``ensure_writable_dir``, ``resume_from_last``, ``read_result``,
  ``write_json`` (a run's folder)
"""

from nas_core.engine.batches import alpha_batches, epoch_lengths, search_steps, to_device, train_batches
from nas_core.engine.context import RunContext, StepGuard, TrainingError, adam, prepare_model, setup_run
from nas_core.engine.rundir import ensure_writable_dir, guard_out_dir, read_result, resume_from_last, write_json
from nas_core.engine.steps import compute_loss, epoch_losses, optimisation_step, progress
from nas_core.engine.tail import EpochTail, improves

__all__ = [
    "EpochTail", "RunContext", "StepGuard", "TrainingError", "adam", "alpha_batches", "compute_loss",
    "ensure_writable_dir", "epoch_lengths", "epoch_losses", "guard_out_dir", "improves", "optimisation_step",
    "prepare_model", "progress", "read_result", "resume_from_last", "search_steps", "setup_run", "to_device",
    "train_batches", "write_json",
]
