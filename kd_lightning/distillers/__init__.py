r"""Distillation terms: one small module per method, combined by :class:`~kd_lightning.DistillationModule`.

A run's loss is a weighted sum of terms, a mapping from each term's name to its ``class_path``/``init_args``::

    model:
      init_args:
        terms:
          ce: {class_path: kd_lightning.distillers.CrossEntropy, init_args: {weight: 1.0}}   # the hard labels
          kd: {class_path: kd_lightning.distillers.HintonKD, init_args: {weight: 0.9, temperature: 4.0}}
          at:
            class_path: kd_lightning.distillers.AttentionTransfer
            init_args: {weight: 1000.0, student_layers: [stages.1, stages.2], teacher_layers: [stages.1, stages.2]}

``loss = sum_i weight_i * sum(term_i(step).values())``; each value is logged as ``train/loss_<name>`` (and
``val/``, ``test/``) after weighting, so the logged parts add up to ``train/loss``. The name addresses a term's
settings on the command line and in studies (``--model.init_args.terms.kd.init_args.temperature 2``) and in
schedules (``terms.kd.temperature``). A list of terms (each named by its ``name``, default its kind) works too.

A term sees one :class:`StepOutputs` per step: the student's logits, the teacher's heads, the targets, the
features of the layers it asked for (captured by forward hooks in the same forward passes that give the logits),
the epoch and the optional per-sample index. It returns a dict of named loss values (unweighted).

To add a method: write its loss as a documented function in :mod:`kd_lightning.losses` (or here), subclass
:class:`DistillationTerm` below with ``name``, optional ``student_layers``/``teacher_layers``, optional
``build`` (adapters, from the feature shapes of a dry run) and ``forward``; name it in a YAML file.

Adapters (FitNets' regressor) belong to the training run, not to the student: they live in the module's
``terms`` (checkpointed, restored on resume, optimised in their own parameter group) and never in
``module.student``, so exports and parameter counts of the student do not include them.
"""

from kd_lightning.distillers import base, crd, features, logits, relations
from kd_lightning.distillers.base import *  # noqa: F403 - each family module lists its public names in __all__
from kd_lightning.distillers.crd import *  # noqa: F403
from kd_lightning.distillers.features import *  # noqa: F403
from kd_lightning.distillers.logits import *  # noqa: F403
from kd_lightning.distillers.relations import *  # noqa: F403

__all__ = sorted([*base.__all__, *logits.__all__, *features.__all__, *relations.__all__, *crd.__all__])
