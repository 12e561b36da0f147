"""Networks by config, with their own input adaptation, and the weights-only model file format.

Every model built here takes RAW shard patches, NHWC, in the shard's dtype (uint8 RGB for WSI,
float16/32 bands for HSI) and adapts them itself (`InputAdapter`): to float NCHW, uint8 → /255 and
ImageNet mean/std, resize to `input_size`. Training, selection and whole-image prediction therefore
share one path and cannot disagree about preprocessing.

Model file (`save_model` / `load_model`): a dict of tensors and plain Python types only, so it is
loadable with ``torch.load(path, weights_only=True)``::

    {"format": "medflow-model/1", "model_cfg": {...}, "n_classes", "in_channels", "patch_size",
     "class_names", "kind", "state_dict": {name: tensor}, ...extra meta (plain JSON types)}
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core import fsio
from ..core.errors import InputError

MODEL_FORMAT = "medflow-model/1"
MODEL_NAMES = ("conv2dnet", "resnet18", "resnet50", "resnet101", "inception_v3", "vgg19")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_INPUT = 299
AUX_LOSS_WEIGHT = 0.4  # torchvision/Szegedy et al. weight of the auxiliary classifier's loss

MODEL_DEFAULTS: dict[str, Any] = {
    "name": "resnet50",
    "input_size": 0,
    "pretrained": "",
    "head_layers": [],
    "dropout": 0.0,
    "trainable_layers": -1,
}


class InputAdapter(nn.Module):
    """Raw NHWC shard patches → float NCHW network input.

    uint8 input is RGB: scaled to [0, 1] and normalised with the ImageNet mean/std. Float input
    (HSI bands, already normalised at extraction) passes through as float32. The NHWC → NCHW
    permute is a view, so the result is channels_last in memory for free.
    """

    def __init__(self, in_channels: int, input_size: int = 0):
        super().__init__()
        self.in_channels = int(in_channels)
        self.input_size = int(input_size)
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) if in_channels == 3 else torch.zeros(1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) if in_channels == 3 else torch.ones(1)
        # Buffers follow .to(device) but are not saved: they are constants, not learned state.
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"expected NHWC patches with {self.in_channels} channels, got shape {tuple(x.shape)}")
        is_rgb8 = x.dtype == torch.uint8
        x = x.permute(0, 3, 1, 2).float()
        if is_rgb8:
            x = x / 255.0
            if self.in_channels == 3:
                x = (x - self.mean) / self.std  # type: ignore[operator]  # registered buffers are Tensors
        size = self.input_size
        if size and (x.shape[-2] != size or x.shape[-1] != size):
            # Antialias when shrinking (224 → 112), else bilinear aliasing changes texture features.
            shrink = x.shape[-2] > size or x.shape[-1] > size
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
        return x


class Head(nn.Sequential):
    """Classifier head: optional Linear+ReLU+Dropout layers, then Linear → classes. One block for freezing."""

    def __init__(self, in_features: int, n_classes: int, head_layers: list[int], dropout: float):
        layers: list[nn.Module] = []
        width = in_features
        for hidden in head_layers:
            layers += [nn.Linear(width, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            width = hidden
        layers.append(nn.Linear(width, n_classes))
        super().__init__(*layers)


class Conv2DNet(nn.Module):
    """The brain-tumour HSI net: Conv2d(B,16,k=2) → MaxPool 2×2 → ReLU → flatten → FC 64 → FC classes.

    For 7×7 patches the flatten size is 16·3·3 = 144, as in the reference; for k×k it is 16·⌊(k-1)/2⌋².
    """

    def __init__(self, in_channels: int, n_classes: int, patch_size: int, head_layers: list[int], dropout: float):
        super().__init__()
        side = (patch_size - 1) // 2
        if side < 1:
            raise InputError(None, f"conv2dnet needs patches of at least 3×3, got {patch_size}×{patch_size}")
        self.conv = nn.Conv2d(in_channels, 16, kernel_size=2)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(16 * side * side, 64)
        self.fc = Head(64, n_classes, head_layers, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.pool(self.conv(x)))
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc(x)


class MedflowNet(nn.Module):
    """InputAdapter + network. ``spec`` says how to rebuild it (saved with the weights)."""

    def __init__(self, adapter: InputAdapter, net: nn.Module, spec: dict[str, Any]):
        super().__init__()
        self.adapter = adapter
        self.net = net
        self.spec = spec

    def forward(self, x: torch.Tensor) -> Any:  # logits, or (logits, aux) for inception_v3 in training
        return self.net(self.adapter(x))

    def train(self, mode: bool = True) -> MedflowNet:
        super().train(mode)
        # Frozen blocks keep their BatchNorm statistics: otherwise fine-tuning drifts them anyway.
        for module in self.net.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
                p.requires_grad for p in module.parameters(recurse=False)
            ):
                module.eval()
        return self


# ---- construction --------------------------------------------------------------------------------
def model_config(model_cfg: dict | None) -> dict[str, Any]:
    """The model section with defaults filled (the schema's defaults; callers may pass a partial dict)."""
    cfg = {**copy.deepcopy(MODEL_DEFAULTS), **copy.deepcopy(model_cfg or {})}
    if cfg["name"] not in MODEL_NAMES:
        raise InputError(None, f"unknown model {cfg['name']!r}; choose one of {', '.join(MODEL_NAMES)}")
    return cfg


def effective_input_size(model_cfg: dict, patch_size: int) -> int:
    """Size the network sees: input_size, else 299 for inception_v3, else the patch size (0 = no resize)."""
    size = int(model_cfg.get("input_size") or 0)
    if model_cfg["name"] == "inception_v3" and not size:
        size = INCEPTION_INPUT
    if model_cfg["name"] == "conv2dnet":
        return 0  # the HSI net is defined on native k×k patches
    return 0 if size == patch_size else size


def _first_conv(in_channels: int, like: nn.Conv2d) -> nn.Conv2d:
    # torch types the attributes as tuple[int, ...]; the constructor wants 2-tuples (which they are).
    geometry: dict[str, Any] = {"kernel_size": like.kernel_size, "stride": like.stride, "padding": like.padding}
    return nn.Conv2d(in_channels, like.out_channels, bias=like.bias is not None, **geometry)


def _torchvision_net(cfg: dict, n_classes: int, in_channels: int) -> nn.Module:
    # Imported here: `import torchvision` costs ~1.2 s (it pulls in torch._dynamo), paid by every rank of
    # every job at start-up, while conv2dnet jobs (HSI) never need it.
    import torchvision

    name, heads, dropout = cfg["name"], list(cfg["head_layers"]), float(cfg["dropout"])
    if name.startswith("resnet"):
        net = getattr(torchvision.models, name)(weights=None)
        if in_channels != 3:
            net.conv1 = _first_conv(in_channels, net.conv1)
        net.fc = Head(net.fc.in_features, n_classes, heads, dropout)
    elif name == "inception_v3":
        net = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=True, transform_input=False)
        if in_channels != 3:
            net.Conv2d_1a_3x3.conv = _first_conv(in_channels, net.Conv2d_1a_3x3.conv)
        net.fc = Head(net.fc.in_features, n_classes, heads, dropout)
        net.AuxLogits.fc = nn.Linear(net.AuxLogits.fc.in_features, n_classes)
    elif name == "vgg19":
        net = torchvision.models.vgg19(weights=None)
        if in_channels != 3:
            net.features[0] = _first_conv(in_channels, net.features[0])
        net.classifier[-1] = Head(net.classifier[-1].in_features, n_classes, heads, dropout)
    else:  # pragma: no cover - model_config rejects unknown names
        raise InputError(None, f"unknown model {name!r}")
    return net


def parameter_blocks(net: nn.Module) -> list[nn.Module]:
    """Parameterised blocks in forward order: top-level children, Sequential containers expanded
    (VGG's conv/linear layers), a classifier `Head` kept as one block."""
    blocks: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, nn.Sequential) and not isinstance(child, Head):
                visit(child)
            elif any(True for _ in child.parameters()):
                blocks.append(child)

    visit(net)
    return blocks


def freeze_all_but_last(net: nn.Module, trainable: int) -> None:
    """Leave the last ``trainable`` parameterised blocks trainable (-1 = all, 0 = none)."""
    if trainable < 0:
        return
    blocks = parameter_blocks(net)
    for p in net.parameters():
        p.requires_grad_(False)
    for block in blocks[len(blocks) - trainable :] if trainable else []:
        for p in block.parameters():
            p.requires_grad_(True)


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "net."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def load_pretrained(net: nn.Module, path: str | Path) -> dict[str, int]:
    """Copy matching tensors from a local state-dict file (.pt/.pth, a medflow model or a checkpoint).

    Tensors whose name or shape does not match (the replaced classifier, a changed first conv) are
    skipped; a file matching fewer than half of the network's tensors is an InputError.
    """
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(path, "pretrained weights file not found") from None
    except Exception as exc:  # corrupt file, pickle with code objects, ...
        raise InputError(path, f"not a weights-only state dict ({type(exc).__name__}: {exc})") from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(path, "no state dict of tensors found")
    source = _strip_prefixes(obj)
    target = net.state_dict()
    matched = {k: v for k, v in source.items() if k in target and target[k].shape == v.shape}
    if len(matched) < len(target) / 2:
        raise InputError(path, f"only {len(matched)} of {len(target)} tensors match this network")
    net.load_state_dict(matched, strict=False)
    return {"matched": len(matched), "skipped": len(source) - len(matched), "total": len(target)}


def build(model_cfg: dict | None, n_classes: int, in_channels: int, patch_size: int) -> MedflowNet:
    """Build the network named by ``model_cfg`` (the `definitions.model` config section)."""
    cfg = model_config(model_cfg)
    if n_classes < 2:
        raise InputError(None, f"need at least 2 classes, got {n_classes}")
    if cfg["name"] == "conv2dnet":
        net: nn.Module = Conv2DNet(in_channels, n_classes, patch_size, list(cfg["head_layers"]), float(cfg["dropout"]))
    else:
        net = _torchvision_net(cfg, n_classes, in_channels)
    if cfg["pretrained"]:
        load_pretrained(net, cfg["pretrained"])
    freeze_all_but_last(net, int(cfg["trainable_layers"]))
    spec = {
        "model_cfg": cfg,
        "n_classes": int(n_classes),
        "in_channels": int(in_channels),
        "patch_size": int(patch_size),
    }
    return MedflowNet(InputAdapter(in_channels, effective_input_size(cfg, patch_size)), net, spec)


# ---- outputs --------------------------------------------------------------------------------------
def logits_of(output: Any) -> torch.Tensor:
    """Main logits of a forward pass (inception_v3 returns (logits, aux_logits) in training mode)."""
    return output[0] if isinstance(output, tuple) else output


def loss_of(output: Any, target: torch.Tensor, criterion: nn.Module) -> torch.Tensor:
    """Training loss, including inception_v3's auxiliary classifier (weight 0.4)."""
    if isinstance(output, tuple) and len(output) == 2 and output[1] is not None:
        return criterion(output[0], target) + AUX_LOSS_WEIGHT * criterion(output[1], target)
    return criterion(logits_of(output), target)


@torch.no_grad()
def predict_proba(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Class probabilities (float32, on x's device) for raw NHWC patches; the model must be in eval mode."""
    return torch.softmax(logits_of(model(x)).float(), dim=1)


# ---- model files ------------------------------------------------------------------------------------
def unwrap(model: nn.Module) -> nn.Module:
    """The MedflowNet inside a DDP wrapper (``.module``)."""
    return getattr(model, "module", model)


def _plain(meta: dict) -> dict:
    # A JSON round trip guarantees only plain types reach the file (weights_only loads refuse others).
    return json.loads(fsio.dumps_json(meta))


def model_payload(model: nn.Module, meta: dict | None = None) -> dict[str, Any]:
    """The dict saved by `save_model` (also embedded in checkpoints)."""
    net = unwrap(model)
    spec = getattr(net, "spec", None)
    if spec is None:
        raise TypeError("save_model needs a model built by medflow.models.build")
    meta = _plain(meta or {})
    payload: dict[str, Any] = {
        "format": MODEL_FORMAT,
        **_plain(spec),
        "class_names": meta.pop("class_names", None),
        "kind": meta.pop("kind", None),
    }
    for key, value in meta.items():
        payload.setdefault(key, value)
    payload["state_dict"] = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    return payload


def save_model(path: str | Path, model: nn.Module, meta: dict | None = None) -> None:
    """Write the weights-only model file atomically (meta: class_names, kind, and any plain extras)."""
    payload = model_payload(model, meta)
    with fsio.atomic_path(path) as tmp:
        torch.save(payload, tmp)


def read_model_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(path, "model file not found") from None
    except Exception as exc:
        raise InputError(path, f"not a readable medflow model ({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        fmt = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise InputError(path, f"not a medflow model file (format {fmt!r})")
    return payload


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[MedflowNet, dict[str, Any]]:
    """Rebuild the network from the file's spec and load its weights; returns (model.eval(), meta)."""
    payload = read_model_file(path)
    meta = {k: v for k, v in payload.items() if k != "state_dict"}
    cfg = dict(payload["model_cfg"], pretrained="")  # the weights come from this file, not the original source
    model = build(cfg, payload["n_classes"], payload["in_channels"], payload["patch_size"])
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise InputError(path, f"weights do not fit the recorded model ({exc})") from None
    return model.to(device).eval(), meta
