"""Token reorderings: exact round trips, text tokens untouched, per-head and per-item orders."""
import pytest
import torch

from accel.attention.reorder import (AXIS_ORDERS, TokenPermutation, axis_order, gather_tokens, hilbert_order,
                                     identity_order, inverse_permutation, per_head_axis_orders, place_text,
                                     tile_major_order, token_major_order)

GRIDS = [(3, 4, 4), (3, 5, 7), (1, 4, 6), (5, 1, 3), (4, 4, 4)]


def coords(grid):
    t, h, w = torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij")
    return torch.stack([t.reshape(-1), h.reshape(-1), w.reshape(-1)], dim=1)


def all_orders(grid):
    orders = {"identity": identity_order(grid), "token_major": token_major_order(grid),
              "tile_2x2x3": tile_major_order(grid, (2, 2, 3)), "tile_1x4x4": tile_major_order(grid, (1, 4, 4)),
              "tile_whole_first": tile_major_order(grid, (2, 2, 3), full_tiles_first=True),
              "hilbert": hilbert_order(grid)}
    orders.update({axes: axis_order(grid, axes) for axes in AXIS_ORDERS})
    return orders


@pytest.mark.parametrize("grid", GRIDS)
def test_every_order_is_a_permutation_with_exact_inverse(grid):
    n = grid[0] * grid[1] * grid[2]
    x = torch.randn(2, n, 3, 4)
    for name, order in all_orders(grid).items():
        assert torch.equal(torch.sort(order).values, torch.arange(n)), name
        inverse = inverse_permutation(order)
        assert torch.equal(order[inverse], torch.arange(n)), name
        perm = TokenPermutation.build(order)
        assert torch.equal(perm.restore(perm.permute_q(x)), x), name


def test_orders_have_their_meaning():
    grid = (3, 5, 7)
    c = coords(grid)
    assert torch.equal(axis_order(grid, "FHW"), torch.arange(105))
    # token-major: the frames of one spatial position are contiguous
    tm = c[token_major_order(grid)]
    assert torch.equal(tm[:3, 1:], tm[:1, 1:].expand(3, 2)) and torch.equal(tm[:3, 0], torch.arange(3))
    # each axis order sorts by its letters, first slowest
    for axes in AXIS_ORDERS:
        ordered = c[axis_order(grid, axes)][:, ["FHW".index(a) for a in axes]]
        key = (ordered[:, 0] * 10 + ordered[:, 1]) * 10 + ordered[:, 2]
        assert bool((key[1:] > key[:-1]).all()), axes
    # tile-major: the first (edge-clipped) tile comes first, whole
    first = c[tile_major_order(grid, (2, 2, 3))][:12]
    assert bool((first[:, 0] < 2).all() and (first[:, 1] < 2).all() and (first[:, 2] < 3).all())
    # whole tiles first: 1 x 2 x 2 whole tiles of 12 tokens lead, each contiguous; clipped tiles follow
    whole = c[tile_major_order(grid, (2, 2, 3), full_tiles_first=True)]
    assert bool((whole[:48, 0] < 2).all() and (whole[:48, 1] < 4).all() and (whole[:48, 2] < 6).all())
    tile_ids = (whole[:48, 1] // 2) * 2 + whole[:48, 2] // 3
    assert torch.equal(tile_ids, torch.arange(4).repeat_interleave(12))


def test_hilbert_steps_to_a_neighbour_on_cubes_and_stays_local_on_odd_grids():
    for grid in [(2, 2, 2), (4, 4, 4), (8, 8, 8)]:
        steps = (c := coords(grid)[hilbert_order(grid)])[1:] - c[:-1]
        assert bool((steps.abs().sum(1) == 1).all()), grid
    c = coords((3, 5, 7))[hilbert_order((3, 5, 7))]
    assert (c[1:] - c[:-1]).abs().sum(1).float().mean() < 1.1


@pytest.mark.parametrize("position", ["prefix", "suffix"])
def test_text_tokens_stay_in_place_and_round_trip(position):
    grid, text = (3, 4, 4), 5
    n = 48
    x = torch.randn(2, n + text, 2, 8)
    text_slice = slice(0, text) if position == "prefix" else slice(n, n + text)
    for name, order in all_orders(grid).items():
        perm = TokenPermutation.build(place_text(order, n, text, position, text_placement="keep"))
        moved = perm.permute_q(x)
        assert torch.equal(moved[:, text_slice], x[:, text_slice]), name
        assert torch.equal(perm.restore(moved), x), name
        # "end" placement: visual tokens first, the text span after them in its own order
        perm_end = TokenPermutation.build(place_text(order, n, text, position, text_placement="end"))
        moved_end = perm_end.permute_q(x)
        assert torch.equal(moved_end[:, n:], x[:, text_slice]), name
        assert torch.equal(perm_end.restore(moved_end), x), name


def test_per_head_axis_orders_round_trip():
    grid = (3, 4, 5)
    orders = per_head_axis_orders(grid, AXIS_ORDERS)  # one of the six per head
    assert orders.shape == (6, 60)
    x = torch.randn(2, 60 + 7, 6, 4)
    perm = TokenPermutation.build(place_text(orders, 60, 7, "prefix"))
    moved = perm.permute_q(x)
    for head, axes in enumerate(AXIS_ORDERS):
        assert torch.equal(moved[:, :60, head], x[:, 7 + axis_order(grid, axes), head])
    assert torch.equal(perm.restore(moved), x)


def test_per_item_orders_and_dropped_keys():
    x = torch.randn(2, 30, 3, 4)
    index = torch.stack([torch.stack([torch.randperm(30) for _ in range(3)]) for _ in range(2)])  # (B, H, S)
    perm = TokenPermutation.build(index)
    moved = perm.permute_q(x)
    assert torch.equal(moved[1, :, 2], x[1, index[1, 2], 2])
    assert torch.equal(perm.restore(moved), x)
    # keys may leave out masked text tokens: the kept ones follow the visual tokens
    kv = place_text(torch.arange(24), 24, 6, "suffix", text_index=torch.tensor([0, 1, 3]))
    assert torch.equal(gather_tokens(x, kv.view(1, 1, -1)), x[:, [*range(24), 24, 25, 27]])


def test_identity_permutation_gathers_nothing():
    x = torch.randn(1, 10, 2, 4)
    perm = TokenPermutation.identity()
    assert perm.permute_q(x) is x and perm.permute_kv(x) is x and perm.restore(x) is x


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="axes"):
        axis_order((2, 2, 2), "FXW")
    with pytest.raises(ValueError, match="tile"):
        tile_major_order((2, 2, 2), (0, 1, 1))
    with pytest.raises(ValueError, match="grid"):
        hilbert_order((2, 2))
    with pytest.raises(ValueError, match="text_position"):
        place_text(torch.arange(4), 4, 2, None)
