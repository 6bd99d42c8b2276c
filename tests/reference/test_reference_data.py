"""The procedural clip generator: determinism, captions, the held-out split, motions."""

import itertools

import pytest
import torch

from accel.pipelines.reference import data


def test_clip_is_deterministic_and_in_range():
    spec = data.Spec("triangle", "yellow", "moving up", "checkered")
    a = data.make_clip(spec, rng=3)
    b = data.make_clip(spec, rng=torch.Generator().manual_seed(3))
    c = data.make_clip(spec, rng=4)
    assert a.shape == (data.NUM_FRAMES, 3, data.HEIGHT, data.WIDTH) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # jitter depends on the seed
    assert 0 <= float(a.min()) and float(a.max()) <= 1


def test_batch_rows_match_single_clips():
    specs = [data.Spec("circle", "red", "growing", "dark"), data.Spec("cross", "blue", "moving left", "gray")]
    batch = data.make_batch(specs, 9, 32, 64, generator=torch.Generator().manual_seed(0))
    assert batch.shape == (2, 9, 3, 32, 64)
    # a clip depends only on the generator state, not on its neighbours' specs
    other = data.make_batch([specs[0], data.Spec("square", "green", "shrinking", "checkered")], 9, 32, 64,
                            generator=torch.Generator().manual_seed(0))
    assert torch.equal(batch[0], other[0])


def test_captions_use_the_vocabulary_and_are_unique():
    specs = data.all_specs()
    assert len(specs) == 4 * 6 * 6 * 3
    caps = [data.caption(s) for s in specs]
    assert len(set(caps)) == len(caps)
    assert data.caption(data.Spec("circle", "red", "moving left", "dark")) == \
        "a red circle moving left on a dark background"
    vocab = set(data.vocabulary())
    assert all(set(c.split()) <= vocab for c in caps)
    assert len(data.vocabulary()) == len(vocab)


def test_held_out_split_is_disjoint_and_covers_every_value():
    train, held = data.train_specs(), data.held_out_specs()
    assert set(train).isdisjoint(held)
    assert set(train) | set(held) == set(data.all_specs())
    assert 0.12 <= len(held) / len(data.all_specs()) <= 0.2
    for field, values in zip(data.Spec._fields, (data.SHAPES, data.COLOUR_NAMES, data.MOTIONS, data.BACKGROUNDS)):
        assert {getattr(s, field) for s in train} == set(values)
        assert {getattr(s, field) for s in held} == set(values)  # held-out prompts exercise every value
    # every pair of attribute values is still seen in training
    for (i, fi), (j, fj) in itertools.combinations(enumerate(data.Spec._fields), 2):
        seen = {(s[i], s[j]) for s in train}
        assert seen == {(s[i], s[j]) for s in data.all_specs()}, (fi, fj)


def test_index_round_trip_and_random_specs():
    for spec in data.all_specs()[::37]:
        assert data.spec_from_index(data.spec_index(spec)) == spec
    idx = data.random_specs(200, torch.Generator().manual_seed(0), held_out=True)
    assert {data.spec_from_index(r) for r in idx} <= set(data.held_out_specs())


def _centroid_and_area(clip):
    # the shape's coverage: distance from the (flat) dark background, 1 inside the shape.  Soft
    # coverage, not a threshold: a thresholded area jumps by a row of pixels with sub-pixel moves
    diff = (clip - clip[:, :, :1, :1]).abs().sum(1)  # (T, H, W)
    mask = diff / diff.amax()
    ys, xs = torch.meshgrid(torch.arange(clip.shape[2]), torch.arange(clip.shape[3]), indexing="ij")
    area = mask.sum((1, 2))
    cx = (mask * xs).sum((1, 2)) / area
    cy = (mask * ys).sum((1, 2)) / area
    return cx, cy, area


def test_motions_do_what_the_caption_says():
    moves = {"moving left": (-1, 0, 0), "moving right": (1, 0, 0), "moving up": (0, -1, 0),
             "moving down": (0, 1, 0), "growing": (0, 0, 1), "shrinking": (0, 0, -1)}
    for motion, (sx, sy, sa) in moves.items():
        clip = data.make_clip(data.Spec("square", "white", motion, "dark"), rng=1)
        cx, cy, area = _centroid_and_area(clip)
        dx, dy, da = float(cx[-1] - cx[0]), float(cy[-1] - cy[0]), float(area[-1] - area[0])
        for sign, delta, big in ((sx, dx, 10), (sy, dy, 5), (sa, da, 100)):
            if sign:
                assert delta * sign > big, (motion, dx, dy, da)
            else:
                assert abs(delta) < 1.0 if big != 100 else abs(delta) < 5, (motion, dx, dy, da)
        assert area.min() > 10  # in frame all the time


def test_spread_centres_start_positions_and_is_validated():
    idx = data.specs_to_tensor([data.Spec("circle", "red", "growing", "dark")] * 256)
    narrow = data.sample_params(idx, 64, 128, torch.Generator().manual_seed(0), spread=0.2)
    full = data.sample_params(idx, 64, 128, torch.Generator().manual_seed(0), spread=1.0)
    # same draws, squeezed towards the centre of the room the shape has
    centre = 64.0
    assert float((narrow["x0"] - centre).abs().max()) <= 0.2 * float((full["x0"] - centre).abs().max()) + 1e-6
    assert torch.equal(narrow["r0"], full["r0"])  # everything else is drawn identically
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="spread"):
            data.sample_params(idx, 64, 128, spread=bad)
