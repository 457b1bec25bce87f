import numpy as np
import pytest
import torch

from catdog.model import MaxPool2x2, SeedNet, build_model, predict_probs


@pytest.mark.parametrize("name", ["seed", "resnet"])
@pytest.mark.parametrize("size", [64, 96])
def test_models_give_one_finite_logit_per_image(name, size):
    torch.manual_seed(0)
    model = build_model(name, size).eval()
    out = model(torch.rand(3, 3, size, size))
    assert out.shape == (3, 1) and torch.isfinite(out).all()


def test_seed_net_is_the_keras_seed_layer_for_layer():
    model = SeedNet(64)
    kinds = [next(c.__name__ for c in type(m).__mro__ if c.__module__.startswith("torch.nn"))
             for m in list(model.features) + list(model.classifier)]
    assert kinds == ["Conv2d", "MaxPool2d", "ReLU", "Conv2d", "ReLU", "MaxPool2d", "Flatten", "Linear", "ReLU",
                     "Linear"]
    # Keras' model.summary() of seed_keras.py: 896 + 9,248 + 802,944 + 129 parameters
    assert sum(p.numel() for p in model.parameters()) == 813_217


def test_seed_net_pooling_before_relu_computes_the_seeds_relu_then_pool():
    torch.manual_seed(0)
    model = SeedNet(64)
    conv1, _, _, conv2, relu2, pool2 = model.features
    keras_order = torch.nn.Sequential(conv1, torch.nn.ReLU(), torch.nn.MaxPool2d(2), conv2, relu2, pool2,
                                      model.classifier)
    x = torch.rand(8, 3, 64, 64)
    ours, theirs = model(x), keras_order(x)
    assert torch.equal(ours, theirs)
    g_ours = torch.autograd.grad(ours.sum(), list(model.parameters()))
    g_theirs = torch.autograd.grad(theirs.sum(), list(model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(g_ours, g_theirs))


@pytest.mark.parametrize("size", [(62, 62), (29, 29), (7, 10), (3, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_inference_pooling_equals_max_pool_2d(size, dtype, channels_last):
    torch.manual_seed(0)
    x = torch.randn(4, 8, *size).to(dtype)
    x[:, :, :2, :2] = 1.0  # ties
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    want = torch.nn.functional.max_pool2d(x, 2)
    with torch.inference_mode():
        got = MaxPool2x2()(x)
    assert got.shape == want.shape and torch.equal(got, want)


def test_seed_net_predicts_the_same_with_and_without_gradients():
    torch.manual_seed(0)
    model = SeedNet(64).eval()
    x = torch.rand(16, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        fast = model(x)
    assert torch.equal(fast, model(x))


def test_resnet_ends_in_global_average_pooling_then_linear():
    model = build_model("resnet")
    assert isinstance(model.pool, torch.nn.AdaptiveAvgPool2d) and isinstance(model.fc, torch.nn.Linear)


@pytest.mark.parametrize("bf16", [False, True])
def test_predict_probs_does_not_depend_on_the_batch_size(bf16):
    torch.manual_seed(0)
    model = build_model("resnet", 40).eval()
    images = np.random.default_rng(0).integers(0, 256, (70, 40, 40, 3), dtype=np.uint8)
    whole = predict_probs(model, images, batch_size=70, tta=True, bf16=bf16)
    assert whole.shape == (70,) and 0 < float(whole.std())
    for batch in (1, 64):
        assert torch.allclose(predict_probs(model, images, batch_size=batch, tta=True, bf16=bf16), whole, atol=1e-6)
