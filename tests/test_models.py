"""The model zoo: every network builds and gives (B, num_classes) logits; parameter counts match the papers."""

from __future__ import annotations

import pytest
import torch
import torchvision.models as tvm

from kd_lightning.models import MODELS, build_model
from kd_lightning.models import torchvision_models
from kd_lightning.models.googlenet import MultiHeadGoogLeNet

NUM_CLASSES = 7
BATCH = 2

IMAGENET_MODELS = ["resnet18", "resnet34", "resnet50", "googlenet", "mobilenet_v3_small", "efficientnet_b0"]
CIFAR_MODELS = ["resnet8x4", "resnet32x4", "resnet20", "resnet56", "wrn_16_2", "wrn_40_2"]
INPUT_SHAPES = {
    **{name: (3, 64, 64) for name in IMAGENET_MODELS},
    **{name: (3, 32, 32) for name in CIFAR_MODELS},
    "flowers_article_cnn": (3, 224, 224),
    "flowers_cnn": (3, 32, 32),
    "digits_cnn": (1, 8, 8),
    "mlp": (64,),
}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_every_model_has_an_input_shape():
    assert set(INPUT_SHAPES) == set(MODELS)


@pytest.mark.parametrize("name", sorted(MODELS))
@torch.no_grad()
def test_builds_and_gives_logits(name):
    model = build_model(name, NUM_CLASSES).eval()
    out = model(torch.randn(BATCH, *INPUT_SHAPES[name]))
    heads = out if isinstance(out, tuple) else (out,)
    for logits in heads:
        assert logits.shape == (BATCH, NUM_CLASSES)
        assert torch.isfinite(logits).all()


@pytest.mark.parametrize("train", [True, False])
def test_googlenet_returns_three_heads_in_train_and_eval(train):
    model = build_model("googlenet", NUM_CLASSES).train(train)
    with torch.no_grad():
        out = model(torch.randn(BATCH, 3, 64, 64))
    assert isinstance(out, tuple) and len(out) == 3
    assert all(logits.shape == (BATCH, NUM_CLASSES) for logits in out)


@torch.no_grad()
def test_googlenet_without_aux_returns_one_tensor():
    model = build_model("googlenet", NUM_CLASSES, aux_logits=False).eval()
    assert model.aux1 is None and model.aux2 is None
    assert model(torch.randn(BATCH, 3, 64, 64)).shape == (BATCH, NUM_CLASSES)


# CIFAR-100 parameter counts of the CRD / DKD tables. resnet20: He et al. quote 0.27M for CIFAR-10 with
# parameter-free shortcuts; the benchmark network (1x1-conv shortcuts, 100 classes) has 0.278M.
PUBLISHED_PARAMS_CIFAR100 = {
    "resnet20": 0.28e6,
    "resnet56": 0.86e6,
    "resnet8x4": 1.23e6,
    "resnet32x4": 7.43e6,
    "wrn_16_2": 0.70e6,
    "wrn_40_2": 2.26e6,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS_CIFAR100))
def test_cifar_parameter_counts(name):
    assert n_params(build_model(name, 100)) == pytest.approx(PUBLISHED_PARAMS_CIFAR100[name], rel=0.02)


@pytest.mark.parametrize("num_classes", [5, 102])  # tf_flowers, Oxford Flowers-102
def test_flowers_cnn_under_100kb(num_classes):
    model = build_model("flowers_cnn", num_classes)
    assert sum(p.numel() * p.element_size() for p in model.parameters()) < 100 * 1024


@torch.no_grad()
def test_flowers_cnn_any_size():
    model = build_model("flowers_cnn", NUM_CLASSES).eval()
    for size in (32, 75, 224):
        assert model(torch.randn(BATCH, 3, size, size)).shape == (BATCH, NUM_CLASSES)


@torch.no_grad()
def test_flowers_article_student_is_the_published_network():
    """conv 7x7/2 (32, pad 3) - ReLU - max-pool 3x3/2 - conv 3x3/2 (32, pad 1) - ReLU - max-pool 3x3/2 - flatten
    - dropout 0.4 - linear with 5,408 inputs at 224 px; the linear layer follows the image size."""
    model = build_model("flowers_article_cnn", 5, image_size=224).eval()
    conv1, conv2 = model.features[0], model.features[3]
    assert (conv1.kernel_size, conv1.stride, conv1.padding, conv1.out_channels) == ((7, 7), (2, 2), (3, 3), 32)
    assert (conv2.kernel_size, conv2.stride, conv2.padding, conv2.out_channels) == ((3, 3), (2, 2), (1, 1), 32)
    assert [m.kernel_size for m in model.features if isinstance(m, torch.nn.MaxPool2d)] == [3, 3]
    assert model.dropout.p == 0.4 and model.fc.in_features == 5408
    assert n_params(model) == (3 * 49 * 32 + 32) + (32 * 9 * 32 + 32) + (5408 * 5 + 5)
    small = build_model("flowers_article_cnn", 5, image_size=128).eval()
    assert small.fc.in_features == 32 * 7 * 7
    assert small(torch.randn(BATCH, 3, 128, 128)).shape == (BATCH, 5)
    with pytest.raises(RuntimeError):  # sized for 128 px: other sizes do not fit its linear layer
        small(torch.randn(BATCH, 3, 224, 224))
    with pytest.raises(ValueError, match="at least 32 px"):
        build_model("flowers_article_cnn", 5, image_size=16)


def test_flowers_article_student_without_image_size_sizes_its_classifier_from_the_first_batch():
    torch.manual_seed(0)
    model = build_model("flowers_article_cnn", 5).eval()  # image_size None: a lazy linear layer
    with torch.no_grad():
        out = model(torch.randn(BATCH, 3, 64, 64))
    assert out.shape == (BATCH, 5) and model.fc.in_features == 32 * 3 * 3
    assert n_params(model) == (3 * 49 * 32 + 32) + (32 * 9 * 32 + 32) + (288 * 5 + 5)
    fresh = build_model("flowers_article_cnn", 5).eval()  # a checkpoint loads into a network never run
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(BATCH, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_unknown_name_lists_known_models():
    with pytest.raises(ValueError, match="Known models") as err:
        build_model("nope", 3)
    assert all(name in str(err.value) for name in MODELS)


def test_unknown_kwarg_is_a_value_error():
    with pytest.raises(ValueError, match="mlp"):
        build_model("mlp", 3, depth=4)


@torch.no_grad()
def test_kwargs_pass_through():
    model = build_model("mlp", NUM_CLASSES, in_features=12, hidden=[32, 16], dropout=0.1)
    widths = [m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert widths == [32, 16, NUM_CLASSES]
    assert any(isinstance(m, torch.nn.Dropout) for m in model.modules())
    assert model.eval()(torch.randn(BATCH, 3, 4)).shape == (BATCH, NUM_CLASSES)  # flattened to 12
    assert n_params(build_model("digits_cnn", 10, channels=8)) < n_params(build_model("digits_cnn", 10))
    assert build_model("wrn_16_2", 10, dropout=0.3).stages[0][0].dropout.p == 0.3


# pretrained=True without a download: hand back randomly initialised ImageNet-shaped networks instead.


@pytest.mark.parametrize("name", sorted(torchvision_models.HEADS))
@torch.no_grad()
def test_pretrained_replaces_head(name, monkeypatch):
    real_get_model = tvm.get_model

    def offline_get_model(arch, weights=None, **kwargs):
        assert weights == "DEFAULT"
        return real_get_model(arch, weights=None, **kwargs)

    monkeypatch.setattr(torchvision_models.tvm, "get_model", offline_get_model)
    model = build_model(name, NUM_CLASSES, pretrained=True).eval()
    assert model(torch.randn(BATCH, 3, 64, 64)).shape == (BATCH, NUM_CLASSES)


@pytest.mark.parametrize("aux_logits", [True, False])
@torch.no_grad()
def test_googlenet_pretrained_replaces_all_heads(aux_logits, monkeypatch):
    imagenet_state = MultiHeadGoogLeNet(init_weights=False).state_dict()
    monkeypatch.setattr(tvm.GoogLeNet_Weights, "get_state_dict", lambda self, **kwargs: imagenet_state)
    model = build_model("googlenet", NUM_CLASSES, aux_logits=aux_logits, pretrained=True).eval()
    assert model.transform_input
    out = model(torch.randn(BATCH, 3, 64, 64))
    heads = out if aux_logits else (out,)
    assert len(heads) == (3 if aux_logits else 1)
    assert all(logits.shape == (BATCH, NUM_CLASSES) for logits in heads)
