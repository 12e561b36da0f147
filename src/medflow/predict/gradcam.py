"""Grad-CAM (Selvaraju et al. 2017) on medflow's networks: forward hook on the last convolutional
block, gradient of the target logit with respect to its output, channel weights = spatial mean of
the gradient, map = ReLU(Σ weight · activation). Equal to captum's ``LayerGradCam`` with
``relu_attributions=True`` (tests/predict/test_gradcam.py); written here to avoid a dependency
(`grad-cam` pulls OpenCV).

Target layers: ResNets ``layer4``, Inception-v3 ``Mixed_7c``, VGG-19 the last block of ``features``
(its max-pool, as pytorch-grad-cam uses), the HSI ``conv2dnet`` its convolution.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..train.models import Conv2DNet, logits_of, unwrap


def target_layer(model: nn.Module) -> nn.Module:
    """The last convolutional block of a medflow network (``MedflowNet.net``)."""
    net = getattr(unwrap(model), "net", model)
    if isinstance(net, Conv2DNet):
        return net.conv
    for name in ("layer4", "Mixed_7c"):
        if hasattr(net, name):
            return getattr(net, name)
    features = getattr(net, "features", None)
    if isinstance(features, nn.Sequential):
        return features[-1]
    raise ValueError(f"no Grad-CAM target layer known for {type(net).__name__}")


def grad_cam(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor | None = None, layer: nn.Module | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(maps (N, h, w) float32 at the layer's resolution, probabilities (N, C)) for ``target`` classes
    (default: the predicted ones). The model is used in eval mode; frozen layers are fine."""
    layer = layer or target_layer(model)
    saved: dict[str, torch.Tensor] = {}

    def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        if not output.requires_grad:  # frozen blocks below: start the graph here
            output = output.detach().requires_grad_(True)
        saved["a"] = output
        return output

    handle = layer.register_forward_hook(hook)
    try:
        model.eval()
        with torch.enable_grad():
            logits = logits_of(model(x)).float()
            if target is None:
                target = logits.argmax(dim=1)
            score = logits.gather(1, target.view(-1, 1).to(logits.device)).sum()
            (grads,) = torch.autograd.grad(score, saved["a"])
    finally:
        handle.remove()
    activation = saved["a"].detach()
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cams = F.relu((weights * activation).sum(dim=1))
    return cams.float().cpu().numpy(), torch.softmax(logits.detach(), dim=1).cpu().numpy()


def upsample(cams: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Maps resized (bilinear) to ``size`` = (h, w) and scaled to [0, 1] per map (all-zero maps stay 0)."""
    t = torch.from_numpy(cams).float().unsqueeze(1)
    up = F.interpolate(t, size=size, mode="bilinear", align_corners=False).squeeze(1).numpy()
    peak = up.reshape(len(up), -1).max(axis=1).reshape(-1, 1, 1)
    return np.divide(up, peak, out=np.zeros_like(up), where=peak > 0)
