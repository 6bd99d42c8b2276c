"""Block-sparse patterns: target density, kept diagonal and text blocks, and the blocks each one picks."""
import math

import pytest
import torch

from accel.base.context import AttnContext, StepContext, TokenLayout
from accel.attention.kernels import block_sparse_attention
from accel.attention.patterns import (SPARSE_PATTERNS, ClusterConfig, RadialConfig, SpatiotemporalConfig,
                                      TileWindowConfig, TopKConfig)
from accel.attention.patterns.tile_window import tile_window_mask
from accel.attention.reorder import AXIS_ORDERS

BLOCK = 16
GRID = (4, 8, 8)  # 256 visual tokens, 16 blocks of 16


def make_ctx(grid=GRID, text=0, position=None, heads=2, step=5, layer=3, generations=1):
    return AttnContext(layer_index=layer, num_layers=8, site=f"blocks.{layer}.attn1", kind="joint" if text else "self",
                       heads=heads, layout=TokenLayout(grid=grid, text_tokens=text, text_position=position),
                       step=StepContext(step_index=step, num_steps=10, generations=generations))


def random_qkv(seq, heads=2, dim=16, batch=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, seq, heads, dim, generator=gen) for _ in range(3)]


# Knobs that make a pattern's density testable on random inputs (a pattern needs none to be tested):
# no attention-sink frame; topk keeps self-similar blocks, and random blocks never are; cluster
# with as many clusters as 16 blocks can hold.
RANDOM_INPUT_KNOBS = {"spatiotemporal": {"sink_frames": 0}, "topk": {"similarity_threshold": -1.0},
                      "cluster": {"q_clusters": 16, "k_clusters": 32}}


def pattern(name, density, **extra):
    cls = SPARSE_PATTERNS.get(name)
    return cls(cls.Config(density=density, block_size=BLOCK, backend="torch", dense_warmup=0.0, dense_layers=0,
                          **{**RANDOM_INPUT_KNOBS.get(name, {}), **extra}))


NAMES = SPARSE_PATTERNS.names()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("target", [0.25, 0.5])
def test_layout_reaches_target_density(name, target):
    q, k, _ = random_qkv(256)
    plan = pattern(name, target).block_layout(q, k, make_ctx())
    assert abs(plan.layout.density() - target) <= 0.07, plan.layout.density()
    assert math.isclose(float(plan.density), plan.layout.density(), rel_tol=1e-9)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("position", ["prefix", "suffix"])
def test_text_blocks_are_dense_and_output_matches_the_masked_reference(name, position):
    text = 20  # not a multiple of the block: the last visual block is shared with text
    q, k, v = random_qkv(256 + text, seed=1)
    plan = pattern(name, 0.25).block_layout(q, k, make_ctx(text=text, position=position))
    mask = plan.layout.to_dense_mask()  # (1|B, 1|H, 18, 18) in working order: visual blocks 0..15 first
    first_text_block = 256 // BLOCK
    assert bool(mask[..., first_text_block:, :].all()) and bool(mask[..., :, first_text_block:].all())
    assert bool((plan.layout.kv_counts > 0).all()), "a query block attends nothing"
    if name != "cluster":  # cluster orders queries and keys differently: no shared diagonal
        assert bool(mask.diagonal(dim1=-2, dim2=-1).all())
    # The sparse output equals dense attention restricted to the layout's token pairs, mapped back
    # to the original order through the permutation: checks the plumbing, not the kernel.
    perm = plan.permutation
    out = perm.restore(block_sparse_attention(perm.permute_q(q), perm.permute_kv(k), perm.permute_kv(v),
                                              plan.layout, backend="torch"))
    work_mask = plan.layout.to_token_mask().expand(1, 2, 276, 276)
    q_index = (perm.q_index if perm.q_index is not None else torch.arange(276).view(1, 1, -1)).expand(1, 2, 276)
    kv_index = (perm.kv_index if perm.kv_index is not None else torch.arange(276).view(1, 1, -1)).expand(1, 2, 276)
    original_mask = torch.zeros(1, 2, 276, 276, dtype=torch.bool)
    for h in range(2):
        original_mask[0, h][q_index[0, h].view(-1, 1), kv_index[0, h].view(1, -1)] = work_mask[0, h]
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=original_mask).transpose(1, 2)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_spatiotemporal_picks_temporal_and_spatial_heads():
    grid = (4, 4, 4)
    t, h, w = torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij")
    spatial_index, frame_index = (h * 4 + w).reshape(-1), t.reshape(-1)
    # Head 0 matches the same spatial position in every frame (temporal); head 1 matches every
    # token of its own frame (spatial).
    temporal_head = torch.nn.functional.one_hot(spatial_index, 16).float() * 6
    spatial_head = torch.nn.functional.one_hot(frame_index, 16).float() * 6
    qk = torch.stack([temporal_head, spatial_head], dim=1).unsqueeze(0)  # (1, 64, 2, 16)
    st = pattern("spatiotemporal", 0.5, sink_frames=1)
    st.block_layout(qk, qk, make_ctx(grid=grid))
    assert st.last_temporal_heads.tolist() == [True, False]
    swapped = qk.flip(2)
    st.block_layout(swapped, swapped, make_ctx(grid=grid))
    assert st.last_temporal_heads.tolist() == [False, True]


def test_spatiotemporal_can_choose_among_all_six_axis_orders():
    grid = (4, 4, 4)
    t, h, w = (axis.reshape(-1) for axis in torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij"))
    # Head 0 attends tokens sharing its column w, head 1 tokens sharing its row h: with one
    # 16-token block per value, the orders that vary w (resp. h) slowest make it block-diagonal.
    qk = torch.stack([torch.nn.functional.one_hot(w, 16).float() * 6,
                      torch.nn.functional.one_hot(h, 16).float() * 6], dim=1).unsqueeze(0)
    st = pattern("spatiotemporal", 0.25, candidate_orders=AXIS_ORDERS)
    st.block_layout(qk, qk, make_ctx(grid=grid))
    chosen = [AXIS_ORDERS[i] for i in st.last_head_orders.tolist()]
    assert chosen[0][0] == "W" and chosen[1][0] == "H", chosen
    assert set(st.counters()["head_orders"]) == set(AXIS_ORDERS)


def test_topk_keeps_the_top_scored_blocks_and_scattered_blocks():
    blocks, dim = 8, 16
    gen = torch.Generator().manual_seed(0)
    key_dirs = torch.eye(dim)[:blocks]  # key block j points along e_j
    best = [(i + 3) % blocks for i in range(blocks)]
    k = key_dirs.repeat_interleave(BLOCK, 0) * 4 + 0.01 * torch.randn(blocks * BLOCK, dim, generator=gen)
    q = key_dirs[best].repeat_interleave(BLOCK, 0) * 4 + 0.01 * torch.randn(blocks * BLOCK, dim, generator=gen)
    q, k = q.view(1, -1, 1, dim), k.view(1, -1, 1, dim)
    ctx = make_ctx(grid=None, heads=1)
    mask = pattern("topk", 2 / blocks).block_layout(q, k, ctx).layout.to_dense_mask()[0, 0]
    expected = torch.eye(blocks, dtype=torch.bool)
    expected[torch.arange(blocks), best] = True  # the diagonal plus the best-scored key block
    assert torch.equal(mask, expected)
    # A key block of unrelated tokens is not represented by its mean: it is kept for every query.
    k_scattered = k.clone()
    k_scattered[0, 5 * BLOCK:6 * BLOCK] = torch.randn(BLOCK, 1, dim, generator=gen)
    mask = pattern("topk", 2 / blocks, similarity_threshold=0.5).block_layout(q, k_scattered, ctx)
    assert bool(mask.layout.to_dense_mask()[0, 0, :, 5].all())


def test_cluster_finds_interleaved_clusters_that_block_order_misses():
    clusters, tokens, dim = 4, 128, 16
    gen = torch.Generator().manual_seed(0)
    member = torch.arange(tokens) % clusters  # interleaved: every block holds every cluster
    centres = torch.eye(dim)[:clusters] * 5
    q = (centres[member] + 0.1 * torch.randn(tokens, dim, generator=gen)).view(1, tokens, 1, dim)
    k = (centres[member] + 0.1 * torch.randn(tokens, dim, generator=gen)).view(1, tokens, 1, dim)
    v = torch.randn(1, tokens, 1, dim, generator=gen)
    ctx = make_ctx(grid=None, heads=1)
    dense = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)

    def error(pat):
        plan = pat.block_layout(q, k, ctx)
        perm = plan.permutation
        out = perm.restore(block_sparse_attention(perm.permute_q(q), perm.permute_kv(k), perm.permute_kv(v),
                                                  plan.layout, backend="torch"))
        return float((out - dense).norm() / dense.norm())

    assert error(pattern("cluster", 0.25, q_clusters=4, k_clusters=4)) < 0.05
    assert error(pattern("topk", 0.25)) > 0.3


def test_cluster_warm_starts_per_layer_and_restarts_each_generation():
    q, k, _ = random_qkv(256, seed=2)
    cl = pattern("cluster", 0.25)
    first = cl.block_layout(q, k, make_ctx(step=2, generations=1))
    assert set(cl.state) == {("blocks.3.attn1", 3, "cond")}
    cl.block_layout(q * 1.1, k, make_ctx(step=3, generations=1))  # warm: centroids move on
    again = cl.block_layout(q, k, make_ctx(step=2, generations=2))  # a new generation starts cold
    assert torch.equal(first.layout.to_dense_mask(), again.layout.to_dense_mask())
    assert torch.equal(first.permutation.q_index, again.permutation.q_index)


def test_radial_band_narrows_with_frame_distance_and_layout_is_reused():
    grid = (8, 8, 8)  # frames of 64 tokens = 4 blocks
    rad = pattern("radial", 0.3)
    q, k, _ = random_qkv(512)
    plan = rad.block_layout(q, k, make_ctx(grid=grid))
    mask = plan.layout.to_dense_mask()[0, 0].view(8, 4, 8, 4)  # (frame, block, frame, block)
    kept_by_distance = [float(torch.stack([mask[f, :, f + d] for f in range(8 - d)]).float().mean()) for d in range(8)]
    assert kept_by_distance[0] == 1.0 or kept_by_distance[0] >= kept_by_distance[1]
    assert all(a >= b for a, b in zip(kept_by_distance, kept_by_distance[1:])), kept_by_distance
    assert kept_by_distance[-1] < kept_by_distance[0]
    assert rad.block_layout(q, k, make_ctx(grid=grid)).layout is plan.layout  # static: one layout per grid


def test_tile_window_keeps_exactly_the_window_of_tiles():
    grid, tile = (4, 8, 8), (1, 4, 4)  # tiles are blocks: 4 x 2 x 2 tiles
    mask = tile_window_mask(grid, tile, (1, 0, 0), BLOCK)
    tile_coords = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(2), torch.arange(2), indexing="ij"),
                              -1).view(-1, 3)
    expected = ((tile_coords[:, None] - tile_coords[None]).abs() <= torch.tensor([1, 0, 0])).all(-1)
    assert torch.equal(mask, expected)
    # grids that tiles do not divide still cover every token and keep the diagonal
    odd = tile_window_mask((3, 5, 7), (2, 2, 3), (0, 1, 0), BLOCK)
    assert bool(odd.diagonal().all()) and odd.shape == (7, 7)


@pytest.mark.parametrize("config_cls, field, value", [
    (TopKConfig, "density", 0.0), (TopKConfig, "density", 1.5), (RadialConfig, "block_size", 48),
    (RadialConfig, "block_size", 8), (TopKConfig, "backend", "cuda"), (TopKConfig, "dense_warmup", -0.1),
    (TopKConfig, "dense_layers", 1.5), (TopKConfig, "reorder", "zigzag"), (TopKConfig, "cdf_threshold", 0.0),
    (RadialConfig, "decay", 0.0), (TileWindowConfig, "tile", (0, 4, 4)), (TileWindowConfig, "window", (1, 1)),
    (SpatiotemporalConfig, "sample_rows", 0), (SpatiotemporalConfig, "sink_frames", -1),
    (SpatiotemporalConfig, "candidate_orders", ("FHW", "XYZ")), (SpatiotemporalConfig, "candidate_orders", ()),
    (ClusterConfig, "q_clusters", 0), (ClusterConfig, "kmeans_iters", 0),
])
def test_bad_config_values_name_the_field(config_cls, field, value):
    with pytest.raises(ValueError, match=field):
        config_cls(**{field: value})
