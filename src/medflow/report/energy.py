"""Device hours, energy and CO₂ of jobs: wall time × GPUs (or CPU cores) × power × PUE × carbon intensity."""

from __future__ import annotations

from typing import Any

from .stats import total


def gpu_devices(rec: dict) -> int:
    """GPUs a job used: its launch devices that are not CPUs."""
    devices = (rec.get("launch") or {}).get("devices") or []
    return sum(1 for d in devices if d and "cpu" not in str(d).lower())


def job_cores(rec: dict, cfg: dict) -> int:
    """CPU cores a job held: ranks × threads per rank for training, wsi.workers for WSI extraction, else 1."""
    launch = rec.get("launch") or {}
    if rec.get("job") == "train":
        threads = launch.get("threads_per_rank") or cfg.get("launch", {}).get("threads_per_rank", 1)
        return max(1, int(launch.get("ranks") or 1) * int(threads))
    if rec.get("job") == "extract-wsi":
        return max(1, int(cfg.get("wsi", {}).get("workers", 1)))
    return 1


def device_hours(rec: dict, cfg: dict) -> dict[str, float]:
    """{"gpu_hours", "cpu_core_hours"} of one job: wall time × GPUs used, or × cores when no GPU was used."""
    hours = float(total([rec.get("wall_s")])) / 3600.0
    gpus = gpu_devices(rec)
    if gpus:
        return {"gpu_hours": hours * gpus, "cpu_core_hours": 0.0}
    return {"gpu_hours": 0.0, "cpu_core_hours": hours * job_cores(rec, cfg)}


def energy_params(cfg: dict) -> dict[str, Any]:
    site = cfg.get("site", {})
    power = site.get("power_w", {})
    return {
        "power_w": {"cpu_core": float(power.get("cpu_core", 12.0)), "gpu": float(power.get("gpu", 300.0))},
        "pue": float(site.get("pue", 1.0)),
        "carbon_g_per_kwh": float(site.get("carbon_g_per_kwh", 250.0)),
    }


def energy_of(hours: dict[str, float], params: dict[str, Any]) -> dict[str, float]:
    """kWh = (GPU-h × W/GPU + core-h × W/core) × PUE / 1000; CO₂ = kWh × g/kWh."""
    watt_hours = hours["gpu_hours"] * params["power_w"]["gpu"] + hours["cpu_core_hours"] * params["power_w"]["cpu_core"]
    kwh = watt_hours * params["pue"] / 1000.0
    return {**hours, "kwh": kwh, "co2_g": kwh * params["carbon_g_per_kwh"]}


def add_hours(acc: dict[str, float], extra: dict[str, float]) -> None:
    for k, v in extra.items():
        acc[k] = acc.get(k, 0.0) + v


def energy(records: dict[str, list[dict]], cfg: dict) -> dict[str, Any]:
    params = energy_params(cfg)
    by_job: dict[str, dict[str, float]] = {}
    total = {"gpu_hours": 0.0, "cpu_core_hours": 0.0}
    for job, recs in sorted(records.items()):
        hours = {"gpu_hours": 0.0, "cpu_core_hours": 0.0}
        for rec in recs:
            add_hours(hours, device_hours(rec, cfg))
        by_job[job] = energy_of(hours, params)
        add_hours(total, hours)
    return {"params": params, "total": energy_of(total, params), "by_job": by_job}
