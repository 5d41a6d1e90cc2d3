"""kd_lightning: knowledge distillation on PyTorch Lightning."""

from kd_lightning.core import Distiller
from kd_lightning.losses import DistillationLoss, distillation_loss, kl_divergence
from kd_lightning.module import ClassifierModule, DistillationModule
from kd_lightning.optim import OptimizerRecipe

__version__ = "0.1.0"
__all__ = ["ClassifierModule", "DistillationLoss", "DistillationModule", "Distiller", "OptimizerRecipe",
           "distillation_loss", "kl_divergence"]
