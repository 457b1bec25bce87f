import pytest
import torch

from catdog.model import SeedNet, build_model


@pytest.mark.parametrize("name", ["seed", "resnet"])
@pytest.mark.parametrize("size", [64, 96])
def test_models_give_one_finite_logit_per_image(name, size):
    torch.manual_seed(0)
    model = build_model(name, size).eval()
    out = model(torch.rand(3, 3, size, size))
    assert out.shape == (3, 1) and torch.isfinite(out).all()


def test_seed_net_is_the_keras_seed_layer_for_layer():
    model = SeedNet(64)
    kinds = [type(m).__name__ for m in list(model.features) + list(model.classifier)]
    assert kinds == ["Conv2d", "ReLU", "MaxPool2d", "Conv2d", "ReLU", "MaxPool2d", "Flatten", "Linear", "ReLU",
                     "Linear"]
    # Keras' model.summary() of seed_keras.py: 896 + 9,248 + 802,944 + 129 parameters
    assert sum(p.numel() for p in model.parameters()) == 813_217


def test_resnet_ends_in_global_average_pooling_then_linear():
    model = build_model("resnet")
    assert isinstance(model.pool, torch.nn.AdaptiveAvgPool2d) and isinstance(model.fc, torch.nn.Linear)
