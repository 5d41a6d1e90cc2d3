"""GoogLeNet / Inception v1 (Szegedy et al., 2015) whose auxiliary heads also run in eval mode.

torchvision's GoogLeNet computes its two auxiliary classifiers only in train mode, but a distillation
teacher runs in eval mode and its student may learn from every head. ``MultiHeadGoogLeNet`` reuses
torchvision's layers and returns all three heads in both modes.
"""

from __future__ import annotations

import torch
import torchvision.models as tvm
from torch import Tensor, nn

from kd_lightning.models.torchvision_models import IMAGENET_CLASSES, replace_head


class MultiHeadGoogLeNet(tvm.GoogLeNet):
    """torchvision's GoogLeNet; forward gives ``(main, aux2, aux1)`` logits when ``aux_logits``, else ``main``."""

    def __init__(
        self,
        num_classes: int = IMAGENET_CLASSES,
        aux_logits: bool = True,
        transform_input: bool = False,
        init_weights: bool = True,
    ) -> None:
        super().__init__(
            num_classes=num_classes,
            aux_logits=aux_logits,
            transform_input=transform_input,
            init_weights=init_weights,
        )

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor, Tensor]:
        x = self._transform_input(x)  # (B, 3, H, W)
        x = self.maxpool1(self.conv1(x))  # (B, 64, H/4, W/4)
        x = self.maxpool2(self.conv3(self.conv2(x)))  # (B, 192, H/8, W/8)
        x = self.maxpool3(self.inception3b(self.inception3a(x)))  # (B, 480, H/16, W/16)
        x = self.inception4a(x)  # (B, 512, H/16, W/16)
        aux1 = self.aux1(x) if self.aux_logits else None  # (B, num_classes)
        x = self.inception4d(self.inception4c(self.inception4b(x)))  # (B, 528, H/16, W/16)
        aux2 = self.aux2(x) if self.aux_logits else None  # (B, num_classes)
        x = self.maxpool4(self.inception4e(x))  # (B, 832, H/32, W/32)
        x = self.inception5b(self.inception5a(x))  # (B, 1024, H/32, W/32)
        x = torch.flatten(self.avgpool(x), 1)  # (B, 1024)
        logits = self.fc(self.dropout(x))  # (B, num_classes)
        if self.aux_logits:
            return logits, aux2, aux1
        return logits


def googlenet(num_classes: int, aux_logits: bool = True, pretrained: bool = False) -> nn.Module:
    """GoogLeNet with main and (optionally) both auxiliary heads of ``num_classes`` outputs.

    ``pretrained=True`` loads torchvision's DEFAULT ImageNet weights (downloaded on first use). Those
    weights were ported from TensorFlow and expect ``transform_input=True``, as torchvision sets it; their
    auxiliary heads are not trained. Heads are replaced by fresh Linears unless ``num_classes == 1000``.
    """
    if not pretrained:
        return MultiHeadGoogLeNet(num_classes=num_classes, aux_logits=aux_logits)
    model = MultiHeadGoogLeNet(aux_logits=True, transform_input=True, init_weights=False)
    model.load_state_dict(tvm.GoogLeNet_Weights.DEFAULT.get_state_dict(progress=True, check_hash=True))
    if not aux_logits:
        model.aux_logits, model.aux1, model.aux2 = False, None, None
    if num_classes != IMAGENET_CLASSES:
        for head in ("fc", "aux1.fc2", "aux2.fc2") if aux_logits else ("fc",):
            replace_head(model, head, num_classes)
    return model
