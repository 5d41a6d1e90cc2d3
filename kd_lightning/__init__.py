"""kd_lightning: knowledge distillation on PyTorch Lightning."""

from kd_lightning.losses import DistillationLoss, distillation_loss, kl_divergence
from kd_lightning.module import ClassifierModule, DistillationModule

__version__ = "0.1.0"
__all__ = ["ClassifierModule", "DistillationLoss", "DistillationModule", "distillation_loss", "kl_divergence"]
