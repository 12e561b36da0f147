"""medflow.models: every network builds and runs on raw NHWC shard patches; weights-only model files."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medflow.core.errors import InputError
from medflow.train import models

CE = nn.CrossEntropyLoss()


def _raw(n: int, k: int, c: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if dtype == torch.uint8:
        return torch.randint(0, 256, (n, k, k, c), generator=g, dtype=torch.uint8)
    return torch.randn(n, k, k, c, generator=g).to(dtype)


def _train_step_and_predict(model: nn.Module, x: torch.Tensor, n_classes: int) -> None:
    y = torch.arange(len(x)) % n_classes
    model.train()
    loss = models.loss_of(model(x), y, CE)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    model.eval()
    prob = models.predict_proba(model, x)
    assert prob.shape == (len(x), n_classes)
    assert torch.allclose(prob.sum(1), torch.ones(len(x)), atol=1e-5)


def test_conv2dnet_matches_reference_architecture():
    model = models.build({"name": "conv2dnet"}, n_classes=5, in_channels=25, patch_size=7)
    net = model.net
    assert net.conv.in_channels == 25 and net.conv.out_channels == 16 and net.conv.kernel_size == (2, 2)
    assert net.fc1.in_features == 144 and net.fc1.out_features == 64
    assert net.fc[-1].in_features == 64 and net.fc[-1].out_features == 5
    _train_step_and_predict(model, _raw(4, 7, 25, torch.float16), 5)


@pytest.mark.parametrize("k, flat", [(5, 64), (9, 256), (11, 400)])
def test_conv2dnet_flatten_generalises_to_patch_size(k, flat):
    model = models.build({"name": "conv2dnet"}, 3, 8, k)
    assert model.net.fc1.in_features == flat
    assert models.predict_proba(model.eval(), _raw(2, k, 8, torch.float32)).shape == (2, 3)


def test_conv2dnet_rejects_too_small_patches():
    with pytest.raises(InputError, match="3×3"):
        models.build({"name": "conv2dnet"}, 3, 8, 2)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnets_on_uint8_rgb_with_resize(name):
    model = models.build({"name": name, "input_size": 64}, 2, 3, 96)
    _train_step_and_predict(model, _raw(2, 96, 3, torch.uint8), 2)


def test_resnet_with_hsi_bands_replaces_first_conv():
    model = models.build({"name": "resnet18"}, 4, 25, 32)
    assert model.net.conv1.in_channels == 25
    _train_step_and_predict(model, _raw(2, 32, 25, torch.float16), 4)


@pytest.mark.slow
def test_resnet101_and_vgg19_build_and_train_step():
    for name in ("resnet101", "vgg19"):
        model = models.build({"name": name}, 2, 3, 32)
        _train_step_and_predict(model, _raw(2, 32, 3, torch.uint8), 2)


@pytest.mark.slow
def test_inception_v3_resizes_to_299_and_uses_aux_loss():
    model = models.build({"name": "inception_v3"}, 2, 3, 64)
    assert model.adapter.input_size == 299
    x = _raw(2, 64, 3, torch.uint8)
    model.train()
    out = model(x)
    assert isinstance(out, tuple) and out[1].shape == (2, 2)
    y = torch.tensor([0, 1])
    assert models.loss_of(out, y, CE) > CE(out[0], y)  # aux term is added
    _train_step_and_predict(model, x, 2)


def test_input_adapter_normalises_rgb_and_keeps_float_bands():
    rgb = torch.full((1, 4, 4, 3), 255, dtype=torch.uint8)
    out = models.InputAdapter(3)(rgb)
    expected = (1.0 - torch.tensor(models.IMAGENET_MEAN)) / torch.tensor(models.IMAGENET_STD)
    assert out.shape == (1, 3, 4, 4) and out.dtype == torch.float32
    assert torch.allclose(out[0, :, 0, 0], expected)
    bands = torch.randn(1, 5, 5, 6, dtype=torch.float16)
    out = models.InputAdapter(6)(bands)
    assert torch.equal(out, bands.permute(0, 3, 1, 2).float())
    with pytest.raises(ValueError, match="NHWC"):
        models.InputAdapter(3)(torch.zeros(1, 3, 4, 4, dtype=torch.uint8))


def test_head_layers_and_trainable_layers():
    model = models.build({"name": "resnet18", "head_layers": [32, 16], "dropout": 0.2, "trainable_layers": 2}, 3, 3, 32)
    head = model.net.fc
    assert [m.out_features for m in head if isinstance(m, nn.Linear)] == [32, 16, 3]
    # ResNet stages are expanded into residual blocks: the last 2 blocks are layer4[1] and the head.
    trainable = {".".join(n.split(".")[:2]) for n, p in model.net.named_parameters() if p.requires_grad}
    assert trainable == {"layer4.1", "fc.0", "fc.3", "fc.6"}
    model.train()
    # frozen BatchNorm keeps its statistics, trainable BatchNorm learns them
    assert not model.net.layer4[0].bn1.training and model.net.layer4[1].bn1.training
    frozen = models.build({"name": "conv2dnet", "trainable_layers": 0}, 2, 4, 7)
    assert not any(p.requires_grad for p in frozen.parameters())


def test_vgg_blocks_are_layers_not_containers():
    net = models.build({"name": "vgg19"}, 2, 3, 32).net
    blocks = models.parameter_blocks(net)
    assert len(blocks) == 16 + 2 + 1  # 16 convs, 2 hidden linears, the head


def test_save_and_load_weights_only(tmp_path):
    model = models.build({"name": "conv2dnet", "head_layers": [8]}, 3, 6, 7)
    path = tmp_path / "m" / "model.pt"
    models.save_model(path, model, {"class_names": ["a", "b", "c"], "kind": "hsi", "epochs_run": 4})
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "medflow-model/1" and raw["class_names"] == ["a", "b", "c"] and raw["epochs_run"] == 4
    assert raw["in_channels"] == 6 and raw["patch_size"] == 7 and raw["kind"] == "hsi"
    loaded, meta = models.load_model(path)
    assert not loaded.training and meta["model_cfg"]["head_layers"] == [8]
    x = _raw(5, 7, 6, torch.float32)
    assert torch.equal(models.predict_proba(model.eval(), x), models.predict_proba(loaded, x))
    assert not list(tmp_path.glob("m/.*tmp*"))


def test_load_model_rejects_other_files(tmp_path):
    bad = tmp_path / "x.pt"
    torch.save({"format": "something"}, bad)
    with pytest.raises(InputError, match="not a medflow model"):
        models.load_model(bad)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(InputError, match="not a readable"):
        models.load_model(tmp_path / "junk.pt")
    with pytest.raises(InputError, match="not found"):
        models.load_model(tmp_path / "missing.pt")


def test_pretrained_local_file_loads_matching_tensors(tmp_path):
    source = models.build({"name": "resnet18"}, 7, 3, 32)
    state = {f"module.{k}": v for k, v in source.net.state_dict().items()}  # a DDP-style dump
    weights = tmp_path / "imagenet.pth"
    torch.save(state, weights)
    model = models.build({"name": "resnet18", "pretrained": str(weights)}, 2, 3, 32)
    assert torch.equal(model.net.conv1.weight, source.net.conv1.weight)
    assert model.net.fc[-1].out_features == 2  # the mismatched classifier is left fresh
    torch.save({"conv1.weight": torch.zeros(1)}, weights)
    with pytest.raises(InputError, match="tensors match"):
        models.build({"name": "resnet18", "pretrained": str(weights)}, 2, 3, 32)


def test_unknown_model_name_is_input_error():
    with pytest.raises(InputError, match="unknown model"):
        models.build({"name": "alexnet"}, 2, 3, 32)
