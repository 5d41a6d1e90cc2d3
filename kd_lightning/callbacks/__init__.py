"""Callbacks to drop into any experiment config (``trainer.callbacks`` in YAML):

- :class:`ScalarScheduler` (alias :class:`TemperatureScheduler`, default ``temperature``): schedule any float,
  e.g. the temperature, ``alpha`` or a term's weight (``terms.hint.weight``).
- :class:`ProgressiveUnfreezing`: unfreeze the student's stages one by one, correctly under DDP.
- :class:`KLDivergenceLogger`: KL(teacher || student), entropies and agreement in TensorBoard.
- :class:`TeacherCache`: offline distillation from the teacher's logits on K seeded augmented views, computed once.
- :class:`LastCheckpoint`: ``last.ckpt`` is always the latest state; a checkpoint and exit status on preemption
  (the ``kd-lightning`` command adds it to every fit).
- :class:`PredictionWriter`: ``kd-lightning predict`` writes the predictions to ``predictions.csv`` (the command
  adds it, settable as ``prediction.*``).
"""

from kd_lightning.callbacks.kl_divergence_logger import KLDivergenceLogger
from kd_lightning.callbacks.last_checkpoint import LastCheckpoint
from kd_lightning.callbacks.prediction_writer import PredictionWriter
from kd_lightning.callbacks.progressive_unfreezing import ProgressiveUnfreezing
from kd_lightning.callbacks.teacher_cache import TeacherCache
from kd_lightning.callbacks.temperature_scheduler import ScalarScheduler, TemperatureScheduler

__all__ = ["KLDivergenceLogger", "LastCheckpoint", "PredictionWriter", "ProgressiveUnfreezing", "ScalarScheduler",
           "TeacherCache", "TemperatureScheduler"]
