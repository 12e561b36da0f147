"""The CUDA paths of training: AMP, channels_last, GPU pinning by local rank, NCCL DDP on one GPU, Horovod's
CUDA allreduce, and `medflow train` on a GPU. Skipped without CUDA (run by benchmarks/gpu_check.sh)."""

from __future__ import annotations

import datetime
import json

import pytest
import torch
from torch import nn

from medflow import cli
from medflow.bench.inputs import write_synthetic_cohort
from medflow.train import dist, models, rendezvous
from medflow.train.trainer import Trainer

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TRAIN_CFG = {"lr": 1e-3, "warmup_epochs": 0, "scheduler": "none", "epochs": 1}


def _step_setup(backend: str = "none", amp: bool = True, channels_last: bool = True):
    device = torch.device("cuda", 0)
    torch.manual_seed(0)
    net = models.build({"name": "resnet18", "input_size": 64}, 2, 3, 64).to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    d = dist.Dist(backend, 0, 1, 0, device)
    scaler = torch.amp.GradScaler("cuda") if amp else None
    trainer = Trainer(d.wrap_model(net), opt, nn.CrossEntropyLoss(), d, TRAIN_CFG, 0.01, 0.01, scaler)
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (8, 64, 64, 3), dtype=torch.uint8, generator=gen).to(device)
    y = torch.randint(0, 2, (8,), generator=gen).to(device)
    return trainer, net, x, y


def _train_steps(trainer: Trainer, x: torch.Tensor, y: torch.Tensor, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        with trainer.autocast():
            out = trainer.model(x)
            loss = models.loss_of(out, y, trainer.criterion)
        trainer.step(loss)
        losses.append(float(loss))
    return losses


def test_amp_step_runs_in_half_precision_and_learns():
    trainer, net, x, y = _step_setup(amp=True)
    with trainer.autocast():
        assert trainer.model(x).dtype == torch.float16  # autocast is active
    before = [p.detach().clone() for p in net.parameters()]
    losses = _train_steps(trainer, x, y, 20)
    assert all(map(torch.isfinite, map(torch.tensor, losses))) and losses[-1] < losses[0]
    assert all(p.dtype == torch.float32 for p in net.parameters())  # fp32 master weights
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert trainer.scaler.get_scale() > 0


def test_channels_last_matches_contiguous():
    trainer_cl, net_cl, x, _ = _step_setup(amp=False, channels_last=True)
    _, net_c, _, _ = _step_setup(amp=False, channels_last=False)
    net_cl.eval(), net_c.eval()
    conv = next(m for m in net_cl.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(net_cl(x), net_c(x), rtol=1e-3, atol=1e-3)


def test_gpu_pinned_by_local_rank():
    count = torch.cuda.device_count()
    for local_rank in range(2 * count):
        device = dist._pick_device(local_rank)
        assert device == torch.device("cuda", local_rank % count)
        assert torch.cuda.current_device() == local_rank % count


def test_nccl_ddp_on_one_gpu():
    import torch.distributed as td

    port = rendezvous.free_port()
    td.init_process_group(
        "nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, timeout=datetime.timedelta(seconds=60)
    )
    try:
        assert td.get_backend() == "nccl"
        trainer, net, x, y = _step_setup(backend="ddp", amp=True)
        assert isinstance(trainer.model, nn.parallel.DistributedDataParallel)
        losses = _train_steps(trainer, x, y, 10)
        assert losses[-1] < losses[0]
        d = dist.Dist("ddp", 0, 1, 0, torch.device("cuda", 0))
        assert d.allreduce_sum([1.0, 2.0]).tolist() == [1.0, 2.0]  # NCCL allreduce of a CUDA tensor
    finally:
        td.destroy_process_group()


def test_horovod_cuda_allreduce():
    hvd = pytest.importorskip("horovod.torch")
    if not hvd.nccl_built() and not hvd.cuda_built():
        pytest.skip("horovod built without CUDA")
    hvd.init()
    try:
        t = torch.arange(4, dtype=torch.float32, device="cuda")
        out = hvd.allreduce(t, op=hvd.Sum, name="medflow.test.cuda")
        assert out.device.type == "cuda" and out.tolist() == [0.0, 1.0, 2.0, 3.0]
    finally:
        hvd.shutdown()


def test_train_command_on_the_gpu(tmp_path):
    """`medflow train` (one process) on a GPU with AMP and channels_last: the record names the device."""
    images = {f"img{i}": (f"p{i}", [i % 2] * 24 + [1 - i % 2] * 24) for i in range(6)}
    index = write_synthetic_cohort(tmp_path, images, ["normal", "tumour"], patch_shape=(32, 32, 3), cohort="c")
    cfg = {
        "results": str(tmp_path / "results"),
        "cohorts": {"c": {"kind": "wsi", "manifest": str(tmp_path / "unused.csv")}},
        "folds": {"outer": 2, "inner": 2},
        "studies": {"s": {"cohort": "c", "model": {"name": "resnet18"}, "train": {"epochs": 2, "batch_size": 8}}},
        "launch": {"ranks": 1},
    }
    (tmp_path / "cfg.yaml").write_text(json.dumps(cfg))
    folds = tmp_path / "folds.json"
    assert (
        cli.main(
            [
                "plan-folds",
                "--config",
                str(tmp_path / "cfg.yaml"),
                "--study",
                "s",
                "--index",
                index,
                "--out",
                str(folds),
            ]
        )
        == 0
    )
    out = tmp_path / "run"
    argv = ["train", "--config", str(tmp_path / "cfg.yaml"), "--study", "s", "--index", index, "--folds", str(folds)]
    assert cli.main([*argv, "--outer", "0", "--inner", "0", "--out-dir", str(out)]) == 0
    record = json.loads((out / "record.json").read_text())
    assert record["status"] == "ok" and record["launch"]["devices"] and "cuda:0" in record["launch"]["devices"][0]
    assert record["launch"]["per_rank"][0]["device"] == "cuda:0"
