"""The shipped judge recognises fresh procedural clips; the Frechet distance is right."""

import numpy as np
import pytest
import torch

from accel.pipelines.reference import data
from accel.pipelines.reference import judge as J


@pytest.fixture(scope="module")
def fresh_clips():
    # held-out combinations (never seen by the judge in training), a seed not used anywhere else
    specs = data.held_out_specs()
    return data.make_batch(specs, generator=torch.Generator().manual_seed(2024)), specs


def test_judge_weights_are_small_and_load():
    import os

    assert os.path.getsize(J.WEIGHTS) < 1_000_000
    model = J.load_judge()
    assert sum(p.numel() for p in model.parameters()) < 250_000


def test_judge_accuracy_on_fresh_held_out_clips(fresh_clips):
    clips, specs = fresh_clips
    acc = J.attribute_accuracy(clips, specs)
    assert all(v >= 0.95 for v in acc.values()), acc
    assert J.prompt_accuracy(clips, specs) >= 0.95


def test_judge_accepts_other_layouts_and_sizes(fresh_clips):
    clips, specs = fresh_clips
    sub = clips[:8]
    pred = J.predict(sub)
    uint8_hwc = (sub.permute(0, 1, 3, 4, 2) * 255).round().to(torch.uint8).numpy()  # (N, T, H, W, 3)
    assert torch.equal(J.predict(list(uint8_hwc)), pred)
    small = data.make_batch(specs[:8], 17, 48, 96, generator=torch.Generator().manual_seed(5))
    assert J.prompt_accuracy(small, specs[:8]) >= 0.75  # resampled input still mostly right


def test_features_and_frechet_distance(fresh_clips):
    clips, _ = fresh_clips
    f = J.judge_features(clips[:16])
    assert f.shape == (16, 128) and np.isfinite(f).all()
    rng = np.random.default_rng(0)
    a = rng.standard_normal((500, 4))
    a -= a.mean(0)
    assert J.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shift = np.array([1.0, 2.0, 0.0, 0.0])
    assert J.frechet_distance(a, a + shift) == pytest.approx(5.0, abs=1e-6)  # same covariance
    # covariances S and 4S, same mean: Tr(S + 4S - 2 sqrt(4 S^2)) = Tr(S)
    assert J.frechet_distance(a, 2 * a) == pytest.approx(np.trace(np.cov(a, rowvar=False)), rel=1e-6)
