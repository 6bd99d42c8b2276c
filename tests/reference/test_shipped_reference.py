"""The shipped reference pipeline: loads offline, is deterministic, follows what it has learned of held-out prompts."""

import os

import pytest

from accel.pipelines.reference import build, data, evaluate
from accel.pipelines.reference import judge as J
from accel.pipelines.reference.train import dir_mb

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


def test_follows_the_colour_and_background_of_held_out_prompts(pipe):
    # every 8th held-out combination (8 of 62), chosen before the weights were trained;
    # `python -m accel.pipelines.reference.evaluate` scores all 62.  The shipped weights are
    # provisional (issue 3): they follow colour and background, not yet shape or motion
    # (21% / 29% on all 62, chance 25% / 17%), so the 0.8 bar is asserted on the
    # attributes the model has learned.
    specs = data.held_out_specs()[::8]
    videos = evaluate.generate_videos(pipe, specs, batch_size=len(specs))
    accuracy = J.attribute_accuracy(videos, specs, J.load_judge())
    assert accuracy["colour"] >= 0.8 and accuracy["background"] >= 0.8, accuracy


def test_recorded_evaluation_matches_the_shipped_weights():
    import json

    with open(os.path.join(build.WEIGHTS_DIR, "eval.json")) as f:
        recorded = json.load(f)
    with open(os.path.join(build.WEIGHTS_DIR, "train_log.json")) as f:
        log = json.load(f)
    assert recorded["prompts"] == len(data.held_out_specs())
    # The shipped weights were trained before the trainer moved under the accel namespace.
    assert log["seed"] == 0 and log["command"].split()[:3] in (
        ["python", "-m", "pipelines.reference.train"], ["python", "-m", "accel.pipelines.reference.train"])


@pytest.fixture(scope="module")
def dense_video(pipe):
    return build.generate(pipe)


@pytest.mark.parametrize("kind,threshold", [("teacache", 0.2), ("magcache", 0.12)])
def test_shipped_cache_calibrations_load_and_skip_steps(pipe, dense_video, kind, threshold):
    import accel
    from accel.eval.metrics import psnr

    dense = dense_video
    path = os.path.join(build.CALIBRATION_DIR, f"{kind}-25.json")
    handle = accel.patch(pipe, cache={"name": kind, "threshold": threshold, "calibration": path})
    try:
        cached = build.generate(pipe)
        counters = handle.summary()["methods"]["cache"]["counters"]
    finally:
        handle.remove()
    assert counters["steps_reused"]["cond"] > 0 and counters["compute_fraction"] < 0.8, counters
    assert 25 < psnr(cached, dense) < 100
    assert (build.generate(pipe) == dense).all()  # remove() restored the dense output



@pytest.mark.parametrize("steps", [4, 6, 8, 10])
def test_shipped_dss_solvers_run_their_step_count(pipe, dense_video, steps):
    import accel
    from accel.eval.metrics import psnr

    path = os.path.join(build.CALIBRATION_DIR, f"dss-{steps}.json")
    handle = accel.patch(pipe, solver={"name": "dss", "artifact": path})
    try:
        video = build.generate(pipe)
        counters = handle.summary()["methods"]["solver"]["counters"]
    finally:
        handle.remove()
    assert counters["steps"] == steps, counters
    # against the 25-step UniPC default, not the 50-step Euler teacher it was fitted to: a loose floor
    assert 15 < psnr(video, dense_video) < 100


@pytest.mark.parametrize("cache", ["teacache", "magcache"])
def test_calibrated_caches_by_name_use_the_calibration_shipped_for_the_model(pipe, dense_video, cache):
    """Before: teacache by name used the Wan 1.3B polynomial here and reused 0 of 25 steps, silently."""
    import accel

    with accel.patched(pipe, cache=cache) as handle:
        build.generate(pipe)
        summary = handle.summary()
    assert sum(summary["methods"]["cache"]["counters"]["steps_reused"].values()) > 0, summary
    assert summary["warnings"] == []


def test_dss_by_name_runs_the_shipped_artifact_for_the_step_count_and_a_path_names_it(pipe):
    import accel

    with accel.patched(pipe, solver="dss") as handle:
        build.generate(pipe, num_inference_steps=6)
        counters = handle.summary()["methods"]["solver"]["counters"]
    assert counters["scheduler"] == "DSSScheduler" and counters["steps"] == 6, counters
    with accel.patched(pipe, solver="dss"):
        with pytest.raises(ValueError, match=r"shipped for this model are for \[4, 6, 8, 10\] steps, not 25"):
            build.generate(pipe)
    path = os.path.join(build.CALIBRATION_DIR, "dss-4.json")
    with accel.patched(pipe, solver=path) as handle:  # a path where a name goes
        build.generate(pipe)
        assert handle.summary()["methods"]["solver"]["counters"]["steps"] == 4
    with accel.patched(pipe, cache=os.path.join(build.CALIBRATION_DIR, "teacache-25.json")) as handle:
        assert handle.methods["cache"].name == "teacache" and handle.methods["cache"].calibration is not None



@pytest.mark.parametrize("interval,budget", [(2, 13), (3, 9)])
def test_fixed_cache_runs_the_schedule_searched_for_its_budget(pipe, dense_video, interval, budget):
    """``fixed`` (schedule="auto") computes the steps of the shipped searched schedule with as many
    computed steps as its interval's uniform schedule; at another step count, the uniform one, quietly."""
    import json
    import warnings

    import accel
    from accel.eval.metrics import psnr

    path = os.path.join(build.CALIBRATION_DIR, f"fixed-25-{budget}.json")
    with open(path) as fh:
        searched = json.load(fh)["compute_steps"]
    with accel.patched(pipe, cache={"name": "fixed", "interval": interval}) as handle:
        video = build.generate(pipe)
        counters = handle.summary()["methods"]["cache"]["counters"]
        computed = sorted(handle.methods["cache"].engine.rule.compute_steps)
    assert counters["schedule"] == f"searched ({path})" and computed == searched, counters
    assert counters["steps_reused"]["cond"] == 25 - budget, counters
    assert 30 < psnr(video, dense_video) < 100
    with warnings.catch_warnings(record=True) as caught, \
            accel.patched(pipe, cache={"name": "fixed", "interval": interval}) as handle:
        warnings.simplefilter("always")
        build.generate(pipe, num_inference_steps=10)
        assert handle.summary()["methods"]["cache"]["counters"]["schedule"] == "uniform"
    assert not [w for w in caught if "schedule" in str(w.message)]


def test_fixed_cache_with_the_fitted_forecast_runs_the_shipped_fitted_schedule_or_the_best_one_left(pipe, dense_video):
    """``forecast="fitted"`` runs the shipped fitted artifact for its budget (9 of 25 steps); a budget
    with none runs the schedule searched for TaylorSeer, and another step count the uniform one,
    both forecast by TaylorSeer order 2, quietly (schedule "auto")."""
    import json
    import warnings

    import accel
    from accel.eval.metrics import psnr

    path = os.path.join(build.CALIBRATION_DIR, "fixed-25-9-fitted.json")
    with open(path) as fh:
        fitted = json.load(fh)
    with accel.patched(pipe, cache={"name": "fixed", "interval": 3, "forecast": "fitted"}) as handle:
        video = build.generate(pipe)
        counters = handle.summary()["methods"]["cache"]["counters"]
        computed = sorted(handle.methods["cache"].engine.rule.compute_steps)
    assert counters["schedule"] == f"searched ({path})" and counters["forecast"] == "fitted", counters
    assert computed == fitted["compute_steps"] and counters["steps_reused"]["cond"] == 16, counters
    assert 30 < psnr(video, dense_video) < 100
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with accel.patched(pipe, cache={"name": "fixed", "interval": 3, "forecast": "fitted"}) as handle:
            build.generate(pipe, num_inference_steps=10)
            counters = handle.summary()["methods"]["cache"]["counters"]
    assert (counters["schedule"], counters["forecast"]) == ("uniform", "taylorseer order 2"), counters
    assert not [w for w in caught if "fitted" in str(w.message) or "schedule" in str(w.message)]
