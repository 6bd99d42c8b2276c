"""The shipped reference pipeline: loads offline, is deterministic, follows held-out prompts."""

import os

import pytest

from pipelines.reference import build, data, evaluate
from pipelines.reference import judge as J
from pipelines.reference.train import dir_mb

pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(build.WEIGHTS_DIR, "model_index.json")),
                                reason="no trained reference weights shipped")


@pytest.fixture(scope="module")
def pipe():
    return build.load_reference_pipeline()


def test_shipped_weights_are_small():
    assert dir_mb(build.WEIGHTS_DIR) < 25


def test_generation_is_deterministic_with_the_default_shape(pipe):
    a = build.generate(pipe, num_inference_steps=2)
    b = build.generate(pipe, num_inference_steps=2)
    d = build.REFERENCE_DEFAULTS
    assert a.shape == (d["num_frames"], d["height"], d["width"], 3)
    assert (a == b).all()
    assert not (a == build.generate(pipe, num_inference_steps=2, seed=1)).all()


def test_follows_held_out_prompts_at_the_default_settings(pipe):
    # every 8th held-out combination (8 of 62), chosen before the weights were trained;
    # `python -m pipelines.reference.evaluate` scores all 62
    specs = data.held_out_specs()[::8]
    videos = evaluate.generate_videos(pipe, specs, batch_size=len(specs))
    accuracy = J.prompt_accuracy(videos, specs, J.load_judge())
    assert accuracy >= 0.8, accuracy
