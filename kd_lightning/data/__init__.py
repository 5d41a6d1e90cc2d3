"""LightningDataModules, chosen from YAML by class path (``kd_lightning.data.DigitsDataModule``)."""

from kd_lightning.data.base import UNLABELLED, ClassificationDataModule, PartiallyLabelled
from kd_lightning.data.digits import DigitsDataModule

__all__ = ["UNLABELLED", "ClassificationDataModule", "DigitsDataModule", "PartiallyLabelled"]
