"""LightningDataModules, chosen from YAML by class path (``kd_lightning.data.FlowersDataModule``)."""

from kd_lightning.data.batch import Batch, as_batch
from kd_lightning.data.base import BatchMix, ClassificationDataModule, PartiallyLabelled
from kd_lightning.data.cifar import CIFARDataModule
from kd_lightning.data.digits import DigitsDataModule
from kd_lightning.data.flowers import FlowersDataModule
from kd_lightning.data.images import ImageClassificationDataModule, ImageDataset

__all__ = ["Batch", "BatchMix", "as_batch", "CIFARDataModule", "ClassificationDataModule", "DigitsDataModule",
           "FlowersDataModule", "ImageClassificationDataModule", "ImageDataset", "PartiallyLabelled"]
