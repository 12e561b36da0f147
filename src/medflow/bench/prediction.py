"""N-node scaling efficiency predicted from this node's measurements (`medflow bench`).

For every benchmarked model: its measured single-device step time and gradient size (the ``train``
group, 1 rank) and the α–β fit of the allreduce sweep (the ``allreduce`` group: across nodes when the
bench ran on several nodes, else between 2 ranks of this node, which only bounds the interconnect from
above) give ``predict.<model>.efficiency.n<N>`` for each N in ``bench.predict_nodes``
(`medflow.bench.scaling.efficiency`, ``bench.comm_overlap`` of the allreduce hidden behind backward).
"""

from __future__ import annotations

from typing import Any

from .scaling import AlphaBeta, predict


def link_of(allreduce: dict[str, Any]) -> tuple[AlphaBeta, str] | None:
    """The α–β fit to predict with, and where it was measured."""
    for where, res in (("internode", allreduce.get("internode")), ("intra-node", allreduce)):
        fit = (res or {}).get("fit")
        if fit and fit.get("busbw_gb_per_s"):
            return AlphaBeta(fit["alpha_us"] * 1e-6, 1.0 / (fit["busbw_gb_per_s"] * 1e9)), where
    return None


def predictions(result: dict[str, Any], cfg: dict) -> dict[str, Any] | None:
    """``{"metrics", "details"}`` of the prediction, or None without train and allreduce measurements."""
    details = result.get("details", {})
    found = link_of(details.get("allreduce") or {})
    if found is None or not details.get("train"):
        return None
    link, where = found
    overlap, nodes = float(cfg["bench"]["comm_overlap"]), list(cfg["bench"]["predict_nodes"])
    metrics: dict[str, float] = {}
    models: dict[str, Any] = {}
    for model, runs in details["train"].items():
        r1 = runs.get("r1")
        if not r1 or "step_s" not in r1:
            continue
        for n, eff in predict(r1["step_s"], r1["grad_bytes"], link, nodes, overlap).items():
            metrics[f"predict.{model}.efficiency.n{n}"] = eff
        models[model] = {"step_s": r1["step_s"], "grad_mb": r1["grad_bytes"] / 1e6}
    if not metrics:
        return None
    return {
        "metrics": metrics,
        "details": {
            "link": where,
            "alpha_us": link.alpha_s * 1e6,
            "busbw_gb_per_s": link.busbw_gb_per_s,
            "comm_overlap": overlap,
            "models": models,
            "model": "E(N) = t_step / (t_step + (1 - overlap) (2(N-1) alpha + 2(N-1)/N G beta))",
        },
    }
