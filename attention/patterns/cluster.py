"""``cluster``: per-head k-means of queries and keys; tokens sorted by cluster; blocks by centroid score.

Tokens that attend alike are rarely neighbours in the grid but do have similar q (or k) vectors.
So, per batch item and head, queries and keys are clustered by k-means (warm-started from the
previous step's centroids of the same layer and CFG branch, since q and k drift slowly across
denoising steps), clusters are numbered in video order (by their members' mean position), each
side is sorted by cluster id, and the attention between clusters is
estimated from the centroids: p(a, c) = softmax_c(centroid_q[a] . centroid_k[c] * scale
+ log |c|). Those cluster probabilities are spread over the fixed-size blocks of the sorted
orders (a block's share of each query cluster, each key cluster's share in a block), and per
query block the best key blocks are kept up to ``cdf_threshold`` of that probability or
``density`` of the blocks, whichever comes first.

Queries and keys get different orders; the output is restored with the query order's inverse.
Needs no grid. Cold starts seed k-means by squared distance in a few rounds (``seed_centroids``) from a
fixed local seed, so runs are reproducible.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from accel.base.config import check_range

from .base import (BlockPattern, Geometry, PatternConfig, block_sizes, density_budget, num_blocks, register_pattern,
                   select_blocks)

COLD_START_ITERS_FACTOR = 4  # without warm centroids, k-means needs more rounds to settle
ASSIGN_CHUNK_ELEMENTS = 1 << 26  # bound on the (points x centroids) score buffer per chunk
SEEDING_ROUNDS = 8  # sequential rounds of the cold-start seeding (seed_centroids)
HeadSlice = Tuple[int, int, int]  # (batch, first head held, heads in all): a rank's heads under Ulysses


@dataclass(frozen=True)
class ClusterConfig(PatternConfig):
    """q_clusters/k_clusters: k-means clusters per head (capped at the token count).
    kmeans_iters: Lloyd iterations per call when warm-started.
    cdf_threshold: also stop once this block probability is kept (e.g. 0.9 for SVG2-style adaptive
        sparsity; 1.0: exactly ``density`` of the blocks)."""

    q_clusters: int = 256
    k_clusters: int = 1024
    kmeans_iters: int = 2
    cdf_threshold: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        check_range(owner, "q_clusters", self.q_clusters, 1, 65536, integer=True)
        check_range(owner, "k_clusters", self.k_clusters, 1, 65536, integer=True)
        check_range(owner, "kmeans_iters", self.kmeans_iters, 1, 100, integer=True)
        check_range(owner, "cdf_threshold", self.cdf_threshold, 0.0, 1.0, low_inclusive=False)


def _reduce_scores(points: torch.Tensor, centroids: torch.Tensor, bias: torch.Tensor, alpha: float,
                   reduce: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``reduce`` over centroids of ``bias + alpha * points . centroids``: (G, N, D), (G, C, D) -> (G, N),
    in chunks of points so the (points x centroids) buffer stays bounded."""
    chunk = max(1, ASSIGN_CHUNK_ELEMENTS // (points.shape[0] * centroids.shape[1]))
    return torch.cat([reduce(torch.baddbmm(bias, points[:, i:i + chunk], centroids.transpose(1, 2), alpha=alpha))
                      for i in range(0, points.shape[1], chunk)], dim=1)


def assign(points: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Nearest centroid (Euclidean) of each point: (G, N, D), (G, C, D) -> (G, N) int64."""
    bias = centroids.square().sum(-1).unsqueeze(1) / 2  # argmin |p - c|^2 = argmax p.c - |c|^2 / 2
    return _reduce_scores(points, centroids, -bias, 1.0, lambda scores: torch.argmax(scores, dim=-1))


def _min_squared_distance(points: torch.Tensor, squared_norms: torch.Tensor, centroids: torch.Tensor
                          ) -> torch.Tensor:
    """(G, N): squared distance of each point to its nearest centroid, without a (G, N, D)
    temporary (|p|^2 - 2 p.c + |c|^2)."""
    centroid_norms = centroids.square().sum(-1).unsqueeze(1)  # (G, 1, C)
    nearest = _reduce_scores(points, centroids, centroid_norms, -2.0, lambda scores: scores.amin(dim=-1))
    return (nearest + squared_norms).clamp_min(0.0)


def _uniform(generator: torch.Generator, groups: int, count: int, heads: Optional[HeadSlice]) -> torch.Tensor:
    """(groups, count) draws in [0, 1); with ``heads``, the draws of those heads out of all of them,
    so a rank holding some heads (context parallelism) draws what one process draws for them."""
    if heads is None:
        return torch.rand(groups, count, generator=generator)
    batch, offset, total = heads
    every = torch.rand(batch, total, count, generator=generator)
    return every[:, offset:offset + groups // batch].reshape(groups, count)


def seed_centroids(points: torch.Tensor, clusters: int, seed: int = 0, rounds: int = SEEDING_ROUNDS,
                   heads: Optional[HeadSlice] = None) -> torch.Tensor:
    """k-means++-style seeding in a fixed number of rounds (as k-means|| does): one uniformly drawn
    seed, then ``rounds`` rounds that each draw an equal share of the rest without replacement, with
    probability ~ squared distance to the nearest seed so far (Gumbel top-k).

    Evenly spaced or uniformly drawn seeds alias with the periodic structure of video tokens and
    leave whole clusters unseeded; drawing by distance does not. k-means++ draws one seed per step
    (1,280 sequential steps for the default clusters: 4 minutes and a fragmented heap of
    (G, N, D) temporaries at Wan 1.3B's 32,760 tokens on a CPU); rounds keep it to a handful of
    matrix products. Draws come from a local CPU generator, moved once per round, so seeding is
    reproducible on any device and the global RNG is untouched.
    """
    groups, count, dim = points.shape
    generator = torch.Generator().manual_seed(seed)
    rows = torch.arange(groups, device=points.device)
    first = (_uniform(generator, groups, 1, heads)[:, 0] * count).long().clamp_max(count - 1).to(points.device)
    centroids = points[rows, first].unsqueeze(1)
    squared_norms = points.square().sum(-1)
    nearest = _min_squared_distance(points, squared_norms, centroids)
    per_round = -(-(clusters - 1) // rounds)
    while centroids.shape[1] < clusters:
        take = min(per_round, clusters - centroids.shape[1])
        uniform = _uniform(generator, groups, count, heads).clamp_min(1e-20).to(points.device)
        # log-weight + Gumbel noise: the top ``take`` are a weighted draw without replacement;
        # seeds already drawn (distance 0) come last
        keys = torch.where(nearest > 0, nearest.clamp_min(1e-30).log(), torch.full_like(nearest, -1e30)) \
            - torch.log(-torch.log(uniform))
        chosen = keys.topk(take, dim=1).indices
        drawn = points.gather(1, chosen.unsqueeze(-1).expand(-1, -1, dim))
        centroids = torch.cat([centroids, drawn], dim=1)
        nearest = torch.minimum(nearest, _min_squared_distance(points, squared_norms, drawn))
    return centroids


def kmeans(points: torch.Tensor, clusters: int, iters: int, init: Optional[torch.Tensor] = None,
           heads: Optional[HeadSlice] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lloyd's k-means per group: points (G, N, D) fp32 -> (centroids, labels, cluster sizes)."""
    groups, count, dim = points.shape
    centroids = seed_centroids(points, clusters, heads=heads) if init is None else init
    offsets = (torch.arange(groups, device=points.device) * clusters).view(-1, 1)
    flat_points = points.reshape(groups * count, dim)
    for step in range(iters + 1):
        labels = assign(points, centroids)
        flat_labels = (labels + offsets).view(-1)
        # index_put_(accumulate=True) rather than index_add_: same sums, and on a busy multi-threaded
        # CPU index_add_'s parallel path was measured 100x slower at these sizes.
        sizes = torch.zeros(groups * clusters, device=points.device).index_put_(
            (flat_labels,), torch.ones_like(flat_labels, dtype=torch.float32), accumulate=True).view(groups, clusters)
        if step == iters:
            break
        sums = torch.zeros(groups * clusters, dim, device=points.device).index_put_(
            (flat_labels,), flat_points, accumulate=True)
        means = sums.view(groups, clusters, dim) / sizes.clamp_min(1).unsqueeze(-1)
        centroids = torch.where(sizes.unsqueeze(-1) > 0, means, centroids)  # empty clusters stay put
    return centroids, labels, sizes


def order_clusters_by_position(centroids: torch.Tensor, labels: torch.Tensor, sizes: torch.Tensor
                               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Renumber clusters by the mean token position of their members.

    Cluster ids are arbitrary, but the blocks are fixed-size runs of the cluster-sorted order,
    so a block mixes neighbouring ids. Numbering clusters in video order puts clusters from the
    same region side by side, so a block's clusters tend to need the same key blocks (measured:
    output error at density 0.25 down by about a quarter on locality-dominated heads).
    """
    groups, clusters, dim = centroids.shape
    positions = torch.arange(labels.shape[1], device=labels.device, dtype=torch.float32).expand_as(labels)
    flat = (labels + torch.arange(groups, device=labels.device).view(-1, 1) * clusters).reshape(-1)
    position_sums = torch.zeros(groups * clusters, device=labels.device).index_put_(
        (flat,), positions.reshape(-1), accumulate=True).view(groups, clusters)
    old_of_new = torch.argsort(position_sums / sizes.clamp_min(1), dim=1)
    new_of_old = torch.argsort(old_of_new, dim=1)
    return (centroids.gather(1, old_of_new.unsqueeze(-1).expand(-1, -1, dim)), new_of_old.gather(1, labels),
            sizes.gather(1, old_of_new))


def cluster_shares(sorted_labels: torch.Tensor, clusters: int, block: int) -> torch.Tensor:
    """(G, nb, C) tokens of each cluster in each block of a cluster-sorted order."""
    groups, count = sorted_labels.shape
    blocks = num_blocks(count, block)
    block_of = (torch.arange(count, device=sorted_labels.device) // block).view(1, -1)
    flat = (torch.arange(groups, device=sorted_labels.device).view(-1, 1) * blocks + block_of) * clusters
    counts = torch.zeros(groups * blocks * clusters, device=sorted_labels.device)
    counts.index_put_(((flat + sorted_labels).view(-1),), torch.ones(groups * count, device=sorted_labels.device),
                      accumulate=True)
    return counts.view(groups, blocks, clusters)


@register_pattern
class ClusterPattern(BlockPattern):
    name = "cluster"
    Config = ClusterConfig
    needs_grid = False

    def __init__(self, config: ClusterConfig):
        super().__init__(config)
        # (site, layer, branch) -> (generation, q centroids, k centroids)
        self.state: Dict[tuple, Tuple[int, torch.Tensor, torch.Tensor]] = {}

    def visual_layout(self, q, k, ctx, geom: Geometry, scale: float):
        batch, heads = q.shape[0], q.shape[2]
        q_points, k_points = (self.visual_span(x, geom).transpose(1, 2).reshape(batch * heads, geom.visual_tokens, -1)
                              .float() for x in (q, k))
        q_clusters = min(self.config.q_clusters, geom.visual_tokens)
        k_clusters = min(self.config.k_clusters, geom.visual_tokens)
        key = (ctx.site, ctx.layer_index, ctx.step.branch)
        warm = self.state.get(key)
        expected = ((batch * heads, q_clusters, q_points.shape[-1]), (batch * heads, k_clusters, k_points.shape[-1]))
        if warm is not None and (warm[0] != ctx.step.generations or (warm[1].shape, warm[2].shape) != expected
                                 or warm[1].device != q_points.device):
            warm = None  # a new generation or another shape: start cold, so each run is reproducible
        iters = self.config.kmeans_iters * (1 if warm is not None else COLD_START_ITERS_FACTOR)
        # these heads' seeding draws, whether this process holds every head or a slice of them
        held_slice = heads < ctx.heads and ctx.head_offset + heads <= ctx.heads
        head_slice = (batch, ctx.head_offset, ctx.heads) if held_slice else None
        q_centroids, q_labels, _ = order_clusters_by_position(
            *kmeans(q_points, q_clusters, iters, warm[1] if warm else None, head_slice))
        k_centroids, k_labels, k_sizes = order_clusters_by_position(
            *kmeans(k_points, k_clusters, iters, warm[2] if warm else None, head_slice))
        self.state[key] = (ctx.step.generations, q_centroids, k_centroids)

        q_order = torch.argsort(q_labels, dim=-1, stable=True)
        k_order = torch.argsort(k_labels, dim=-1, stable=True)
        logits = torch.bmm(q_centroids, k_centroids.transpose(1, 2)) * scale + k_sizes.log().unsqueeze(1)
        cluster_prob = torch.softmax(logits, dim=-1)  # (G, Cq, Ck); empty key clusters get 0
        block = self.config.block_size
        q_share = cluster_shares(q_labels.gather(1, q_order), q_clusters, block)
        q_share = q_share / block_sizes(geom.visual_tokens, block, q.device).view(1, -1, 1)
        k_share = cluster_shares(k_labels.gather(1, k_order), k_clusters, block) / k_sizes.clamp_min(1).unsqueeze(1)
        block_prob = q_share @ cluster_prob @ k_share.transpose(1, 2)  # rows sum to 1
        mask = select_blocks(block_prob, density_budget(self.config.density, block_prob.shape[-1]),
                             self.config.cdf_threshold)
        shape = (batch, heads, -1)
        return mask.view(batch, heads, *mask.shape[1:]), q_order.view(shape), k_order.view(shape)
