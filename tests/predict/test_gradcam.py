"""Grad-CAM equals captum's LayerGradCam (the reference) on medflow's networks; stratified sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medflow.predict.explain import sample_groups
from medflow.predict.gradcam import grad_cam, target_layer, upsample
from medflow.train import models

captum_attr = pytest.importorskip("captum.attr")


@pytest.fixture(autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    "name, channels, size, extra",
    [
        ("resnet18", 3, 64, {"input_size": 48}),
        ("resnet18", 3, 64, {"input_size": 48, "trainable_layers": 1}),  # frozen below the head
        ("vgg19", 3, 32, {}),
        ("conv2dnet", 25, 7, {}),
    ],
)
def test_grad_cam_equals_captum_layer_grad_cam(name: str, channels: int, size: int, extra: dict) -> None:
    torch.manual_seed(0)
    model = models.build({"name": name, **extra}, 3, channels, size).eval()
    gen = torch.Generator().manual_seed(1)
    if channels == 3:
        x = torch.randint(0, 256, (4, size, size, channels), dtype=torch.uint8, generator=gen)
    else:
        x = torch.rand((4, size, size, channels), generator=gen)
    target = torch.tensor([0, 1, 2, 1])
    ours, probs = grad_cam(model, x, target)
    reference = captum_attr.LayerGradCam(model, target_layer(model)).attribute(x, target=target, relu_attributions=True)
    ref = reference.detach().squeeze(1).numpy()
    assert ours.shape == ref.shape and ref.max() > 0
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-6 * float(np.abs(ref).max()))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    up = upsample(ours, (size, size))
    assert up.shape == (4, size, size) and up.max() <= 1.0 + 1e-6 and up.min() >= 0


def test_grad_cam_defaults_to_the_predicted_class() -> None:
    torch.manual_seed(0)
    model = models.build({"name": "resnet18", "input_size": 48}, 2, 3, 64).eval()
    x = torch.randint(0, 256, (3, 64, 64, 3), dtype=torch.uint8)
    default, probs = grad_cam(model, x)
    explicit, _ = grad_cam(model, x, torch.from_numpy(probs.argmax(axis=1)))
    np.testing.assert_array_equal(default, explicit)


def test_sample_groups_are_stratified_and_seeded() -> None:
    y_true = np.array([0] * 10 + [1] * 10)
    y_pred = np.array([0] * 8 + [1] * 2 + [1] * 9 + [0])
    groups = sample_groups(y_true, y_pred, 2, 3, np.random.default_rng(7))
    assert [(c, ok, len(rows)) for c, ok, rows in groups] == [(0, True, 3), (0, False, 2), (1, True, 3), (1, False, 1)]
    for c, ok, rows in groups:
        assert ((y_true[rows] == c) & ((y_pred[rows] == c) == ok)).all()
    again = sample_groups(y_true, y_pred, 2, 3, np.random.default_rng(7))
    assert all((a[2] == b[2]).all() for a, b in zip(groups, again))
