"""The α–β allreduce model (`medflow.bench.scaling`) and the N-node prediction of `medflow bench`."""

from __future__ import annotations

import math

import pytest

from medflow.bench import check, prediction, scaling
from medflow.bench.scaling import AlphaBeta


def test_ring_allreduce_time_and_bus_bandwidth():
    link = AlphaBeta.from_link(gbit_per_s=10.0, latency_us=20.0)
    assert link.busbw_gb_per_s == pytest.approx(1.25)
    assert link.allreduce_s(1e9, 1) == 0.0
    # 2(p-1) latencies + 2(p-1)/p of the message over the link
    assert link.allreduce_s(100e6, 4) == pytest.approx(6 * 20e-6 + 1.5 * 100e6 / 1.25e9)
    # Without latency the bus bandwidth NCCL-tests report (algbw * 2(p-1)/p) is the link's, at every p.
    pure = AlphaBeta(0.0, link.beta_s_per_byte)
    for p in (2, 3, 8, 64):
        algbw = 1e8 / pure.allreduce_s(1e8, p)
        assert algbw * 2 * (p - 1) / p == pytest.approx(1.25e9)


@pytest.mark.parametrize("ranks", [2, 4, 16])
def test_fit_recovers_alpha_and_beta(ranks):
    truth = AlphaBeta(35e-6, 1 / 2.5e9)
    sizes = [4096, 65536, 1 << 20, 16 << 20]
    got = scaling.fit(sizes, [truth.allreduce_s(n, ranks) for n in sizes], ranks)
    assert got.alpha_s == pytest.approx(truth.alpha_s, rel=1e-6)
    assert got.busbw_gb_per_s == pytest.approx(2.5, rel=1e-6)
    with pytest.raises(ValueError):
        scaling.fit([4096, 4096], [1e-3, 1e-3], ranks)


def test_fit_of_latency_bound_times_never_claims_infinite_bandwidth():
    # Times that fall with size (noise) or stay flat: no slope to fit; bound beta by the largest message.
    sizes, times = [4096, 65536, 1 << 20], [2.0e-3, 1.8e-3, 1.5e-3]
    got = scaling.fit(sizes, times, 2)
    assert got.busbw_gb_per_s == pytest.approx((1 << 20) / 1.5e-3 / 1e9)  # p = 2: busbw = algbw
    assert got.alpha_s == pytest.approx(1.5e-3 / 2)


def test_efficiency_falls_with_nodes_and_rises_with_link_and_overlap():
    step, grads = 0.10, 102e6  # ResNet-50: 25.6 M fp32 gradients
    slow, fast = AlphaBeta.from_link(1.0, 30.0), AlphaBeta.from_link(100.0, 5.0)
    e = scaling.predict(step, grads, slow, [2, 4, 8, 64])
    assert list(e.values()) == sorted(e.values(), reverse=True)
    assert scaling.efficiency(step, grads, 1, slow) == 1.0
    # by hand: 2 nodes on 1 Gbit/s move 102 MB in 0.816 s (+ 2 x 30 us)
    assert e[2] == pytest.approx(step / (step + 2 * 30e-6 + 102e6 * 8 / 1e9))
    assert scaling.efficiency(step, grads, 8, fast) > e[8]
    assert scaling.efficiency(step, grads, 8, slow, overlap=1.0) == 1.0
    with pytest.raises(ValueError):
        scaling.efficiency(step, grads, 8, slow, overlap=1.5)


def test_overlap_to_match_inverts_the_model():
    link = AlphaBeta.from_link(25.0, 10.0)
    measured = scaling.efficiency(0.5, 178e6, 128, link, overlap=0.4)
    assert scaling.overlap_to_match(0.5, 178e6, 128, link, measured) == pytest.approx(0.4)
    assert scaling.overlap_to_match(0.5, 178e6, 128, link, 0.01) is None  # worse than no overlap at all


def _result(internode: bool) -> dict:
    allreduce = {"fit": {"alpha_us": 5.0, "busbw_gb_per_s": 20.0}}
    if internode:
        allreduce["internode"] = {"fit": {"alpha_us": 50.0, "busbw_gb_per_s": 1.0}}
    train = {"resnet18": {"r1": {"step_s": 0.2, "grad_bytes": 46.8e6}, "r2": {}}}
    return {"details": {"allreduce": allreduce, "train": train}}


def test_bench_prediction_prefers_the_internode_fit():
    cfg = {"bench": {"comm_overlap": 0.0, "predict_nodes": [2, 8]}}
    out = prediction.predictions(_result(internode=True), cfg)
    assert out is not None and out["details"]["link"] == "internode"
    assert set(out["metrics"]) == {"predict.resnet18.efficiency.n2", "predict.resnet18.efficiency.n8"}
    link = AlphaBeta(50e-6, 1 / 1e9)
    assert out["metrics"]["predict.resnet18.efficiency.n8"] == pytest.approx(scaling.efficiency(0.2, 46.8e6, 8, link))
    local = prediction.predictions(_result(internode=False), cfg)
    assert local is not None and local["details"]["link"] == "intra-node"
    assert local["metrics"]["predict.resnet18.efficiency.n8"] > out["metrics"]["predict.resnet18.efficiency.n8"]
    assert prediction.predictions({"details": {"train": {}}}, cfg) is None
    assert not math.isnan(local["details"]["busbw_gb_per_s"])


def test_units_of_the_new_metrics():
    assert check.unit_of("predict.resnet18.efficiency.n8") == "fraction"
    assert check.unit_of("allreduce.internode.fit.alpha_us") == "µs"
    assert check.unit_of("allreduce.internode.busbw_gb_per_s") == "GB/s"
