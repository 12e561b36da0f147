"""The α–β (latency–bandwidth) model of allreduce, its fit, and predicted data-parallel scaling efficiency.

Ring allreduce of ``n`` bytes over ``p`` participants sends 2(p−1) messages of n/p bytes each way
(Patarasuk & Yuan 2009; Thakur et al. 2005):

    t(n, p) = 2(p−1)·α + 2(p−1)/p · n · β

α is the per-message latency, β the seconds per byte of the slowest link, so 1/β is the *bus
bandwidth* as NCCL-tests define it (algbw × 2(p−1)/p). A measured sweep over message sizes at fixed
p fits ``t = a + b·n`` by least squares: α = a / 2(p−1), β = b·p / 2(p−1).

A data-parallel step on N nodes adds the allreduce of the gradients (G bytes) to the single-device
step time t_step, of which a fraction ``overlap`` is hidden behind the backward pass:

    E(N) = t_step / (t_step + (1 − overlap) · t(G, N))

Across nodes the inter-node link is the bottleneck (intra-node reduction over NVLink/shared memory is
taken as free), so p = nodes and α, β are those of the node link. ``overlap = 0`` is the conservative
bound (Horovod and DDP overlap communication with backward in buckets, so real runs do better).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class AlphaBeta:
    """Latency (s) and inverse bandwidth (s/byte) of a link, for ring allreduce."""

    alpha_s: float
    beta_s_per_byte: float

    @property
    def busbw_gb_per_s(self) -> float:
        return 1.0 / self.beta_s_per_byte / 1e9 if self.beta_s_per_byte > 0 else float("inf")

    @classmethod
    def from_link(cls, gbit_per_s: float, latency_us: float) -> AlphaBeta:
        """A link given by its rate (Gbit/s) and per-message latency (µs)."""
        return cls(latency_us * 1e-6, 8.0 / (gbit_per_s * 1e9))

    def allreduce_s(self, nbytes: float, ranks: int) -> float:
        """Ring allreduce time of ``nbytes`` over ``ranks`` participants (0 for one)."""
        if ranks <= 1:
            return 0.0
        return 2 * (ranks - 1) * self.alpha_s + 2 * (ranks - 1) / ranks * nbytes * self.beta_s_per_byte


def fit(sizes_bytes: Sequence[float], seconds: Sequence[float], ranks: int) -> AlphaBeta:
    """Least-squares α–β from allreduce times (one per message size) at ``ranks`` participants.

    Needs two or more distinct sizes; a negative intercept (noise at tiny latencies) is clamped to 0.
    When the times do not grow with size (latency-bound up to the largest message, or noise), the
    slope says nothing: β is then bounded from the largest message alone (as if α were 0, so the
    bandwidth is not overstated) and α from the smallest time."""
    n, t = np.asarray(sizes_bytes, dtype=float), np.asarray(seconds, dtype=float)
    if ranks < 2 or len(np.unique(n)) < 2 or len(n) != len(t):
        raise ValueError("an α–β fit needs at least 2 ranks and 2 distinct message sizes with one time each")
    hops, share = 2 * (ranks - 1), 2 * (ranks - 1) / ranks
    slope, intercept = (float(v) for v in np.polyfit(n, t, 1))
    if slope <= 0:
        largest = int(np.argmax(n))
        return AlphaBeta(float(t.min()) / hops, float(t[largest]) / (share * float(n[largest])))
    return AlphaBeta(max(intercept, 0.0) / hops, slope / share)


def efficiency(step_s: float, grad_bytes: float, nodes: int, link: AlphaBeta, overlap: float = 0.0) -> float:
    """Predicted scaling efficiency of a data-parallel step on ``nodes`` nodes (1.0 on one)."""
    if not 0.0 <= overlap <= 1.0:
        raise ValueError(f"overlap must be in [0, 1], got {overlap}")
    comm = (1.0 - overlap) * link.allreduce_s(grad_bytes, nodes)
    return step_s / (step_s + comm) if step_s > 0 else 0.0


def predict(
    step_s: float, grad_bytes: float, link: AlphaBeta, nodes: Iterable[int], overlap: float = 0.0
) -> dict[int, float]:
    """``{N: E(N)}`` for each node count."""
    return {int(n): efficiency(step_s, grad_bytes, int(n), link, overlap) for n in nodes}


def overlap_to_match(step_s: float, grad_bytes: float, nodes: int, link: AlphaBeta, measured: float) -> float | None:
    """The overlap fraction at which the model reproduces a measured efficiency (None: not reachable)."""
    comm = link.allreduce_s(grad_bytes, nodes)
    if comm <= 0 or not 0 < measured <= 1:
        return None
    hidden = 1.0 - step_s * (1.0 / measured - 1.0) / comm
    return hidden if 0.0 <= hidden <= 1.0 else None
