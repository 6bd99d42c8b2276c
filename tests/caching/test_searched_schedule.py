"""A fixed cache's searched schedule: the search, its artifact, and the cache running exactly it."""
import json
import warnings

import pytest
import torch

import accel
from accel.caching import FixedCacheConfig, load_calibration
from accel.distill.cache_calibration import main
from accel.distill.schedule_search import ScheduleSearch, evenly_spaced_masks, neighbours, search_schedule, psnr_db
from accel.pipelines.tiny import build_tiny_pipeline, tiny_call_kwargs

STEPS = 6


def call_kwargs():
    return {k: v for k, v in tiny_call_kwargs("wan", steps=STEPS).items()
            if k not in ("prompt", "generator", "num_inference_steps", "output_type")}


def test_evenly_spaced_masks_hold_step_zero_and_the_budget():
    masks = evenly_spaced_masks(25, 9)
    assert (0, 2, 5, 8, 11, 14, 17, 20, 23) in masks and (0, 3, 6, 9, 12, 15, 18, 21, 24) in masks
    assert all(len(m) == 9 and m[0] == 0 and m[-1] < 25 for m in masks)
    assert evenly_spaced_masks(25, 25) == [tuple(range(25))] and evenly_spaced_masks(4, 1) == [(0,)]
    with pytest.raises(ValueError, match="budget must be between 1 and the step count 25, got 26"):
        evenly_spaced_masks(25, 26)


def test_neighbours_shift_runs_of_steps_by_one_and_never_step_zero():
    assert neighbours((0, 1, 3), 5, max_run=1) == [(0, 2, 3), (0, 1, 2), (0, 1, 4)]
    moved = neighbours((0, 2, 4, 7), 9)
    assert moved[:6] == [(0, 1, 4, 7), (0, 3, 4, 7), (0, 2, 3, 7), (0, 2, 5, 7), (0, 2, 4, 6), (0, 2, 4, 8)]
    assert (0, 3, 5, 7) in moved and (0, 3, 5, 8) in moved and (0, 1, 3, 6) in moved  # runs of 2 and 3
    assert len(moved) == len(set(moved))
    for mask in moved:
        assert mask[0] == 0 and len(set(mask)) == 4 and mask[-1] < 9 and list(mask) == sorted(mask)


def test_psnr_is_capped_for_equal_outputs_and_falls_with_the_error():
    reference = torch.full((8,), 0.5)
    assert psnr_db(reference, reference) == 100.0
    assert psnr_db(reference + 0.1, reference) == pytest.approx(20.0)
    assert psnr_db(reference - 0.01, reference) == pytest.approx(40.0)


def test_search_scores_are_the_cached_runs_against_dense_and_the_result_never_loses_to_its_start(tmp_path):
    pipe = build_tiny_pipeline("wan")
    out = tmp_path / "fixed.json"
    artifact = search_schedule(pipe, ["a fox"], STEPS, 3, call_kwargs=call_kwargs(), max_evaluations=8, out=str(out))
    search = artifact["search"]
    assert search["score_db"] >= search["start_score_db"] and search["evaluations"] <= 8
    assert artifact["kind"] == "fixed" and artifact["num_steps"] == STEPS and len(artifact["compute_steps"]) == 3
    # the recorded score is what an independent run of that mask gives against dense
    searcher = ScheduleSearch(pipe, ["a fox"], STEPS, call_kwargs=call_kwargs())
    mask = tuple(artifact["compute_steps"])
    with accel.patched(pipe, cache=FixedCacheConfig(compute_steps=mask, forecast="taylorseer", order=2)):
        cached = pipe(prompt="a fox", num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                      output_type="pt", **call_kwargs()).frames
    assert psnr_db(cached, searcher.dense[0]) == pytest.approx(search["score_db"], abs=1e-3)
    assert load_calibration(str(out), "fixed").compute_steps == mask


def test_a_searched_schedule_runs_exactly_its_steps_and_remove_restores(tmp_path, helpers):
    pipe = build_tiny_pipeline("wan")
    dense = helpers.run(pipe, "wan", steps=STEPS)
    artifact = {"kind": "fixed", "model_class": "WanTransformer3DModel", "num_steps": STEPS,
                "compute_steps": [0, 1, 4], "forecast": "taylorseer", "order": 2}
    handle = accel.patch(pipe, cache=FixedCacheConfig(calibration=artifact, forecast="taylorseer", order=2))
    decisions = helpers.decisions(handle)
    helpers.run(pipe, "wan", steps=STEPS)
    counters = helpers.counters(handle)
    handle.remove()
    assert [s for s, b, reused in decisions if b == "cond" and not reused] == [0, 1, 4]
    assert counters["schedule"] == "searched (<dict>)"
    assert torch.equal(helpers.run(pipe, "wan", steps=STEPS), dense)
    with pytest.raises(ValueError, match="fitted for 6 steps, this run has 4"):
        with accel.patched(pipe, cache=FixedCacheConfig(calibration=artifact)):
            helpers.run(pipe, "wan", steps=4)


def test_searched_without_a_fitting_schedule_runs_uniform_and_says_so_once(helpers):
    pipe = build_tiny_pipeline("wan")
    with warnings.catch_warnings(record=True) as caught, \
            accel.patched(pipe, cache=FixedCacheConfig(interval=2, schedule="searched")) as handle:
        warnings.simplefilter("always")
        helpers.run(pipe, "wan", steps=STEPS)
        helpers.run(pipe, "wan", steps=STEPS)
        counters = helpers.counters(handle)
    assert counters["schedule"] == "uniform" and counters["steps_reused"]["cond"] == 6, counters
    said = [str(w.message) for w in caught if "no searched schedule" in str(w.message)]
    assert len(said) == 1 and "3 computed steps of 6" in said[0] and "one step in 2" in said[0], said
    with warnings.catch_warnings(record=True) as caught, \
            accel.patched(pipe, cache=FixedCacheConfig(interval=2, schedule="auto")):
        warnings.simplefilter("always")
        helpers.run(pipe, "wan", steps=STEPS)
    assert not [w for w in caught if "schedule" in str(w.message)]


@pytest.mark.parametrize("fields, message", [
    ({"compute_steps": [0, 0, 3]}, "increasing without repeats"),
    ({"compute_steps": [0, 9]}, r"compute_steps must be in \[0, 5\], got 9"),
    ({"compute_steps": []}, "non-empty list"),
    ({"forecast": "cubic"}, "forecast must be one of"),
    ({"order": 3}, r"order must be in \[1, 2\]"),
])
def test_corrupt_schedules_are_refused_naming_the_field(tmp_path, fields, message):
    good = {"kind": "fixed", "model_class": "WanTransformer3DModel", "num_steps": STEPS,
            "compute_steps": [0, 2, 4], "forecast": "taylorseer", "order": 2}
    path = tmp_path / "fixed-6-3.json"
    path.write_text(json.dumps({**good, **fields}))
    with pytest.raises(ValueError, match=message):
        accel.patch(build_tiny_pipeline("wan"), cache=FixedCacheConfig(calibration=str(path)))


def test_config_refuses_a_mask_with_a_searched_schedule():
    with pytest.raises(ValueError, match="give compute_steps, or a searched schedule"):
        FixedCacheConfig(compute_steps=(0, 2), schedule="searched")
    with pytest.raises(ValueError, match="schedule"):
        FixedCacheConfig(schedule="best")


def test_calibrate_command_searches_a_fixed_schedule(tmp_path, capsys):
    out = tmp_path / "fixed.json"
    args = ["--cache", "fixed", "--model", "tiny:wan", "--prompts", "1", "--steps", "5", "--out", str(out)]
    assert main(args) == 2 and "needs --budget K" in capsys.readouterr().err
    assert main([*args, "--budget", "2", "--max-evaluations", "3"]) == 0
    assert "compute steps [0, " in capsys.readouterr().out
    assert len(load_calibration(str(out), "fixed").compute_steps) == 2


def test_seeds_score_each_prompt_at_several_noise_draws():
    """seeds=2 runs each prompt at two seeds (1000 apart) and averages: its dense references are the
    one-seed search's plus a second, different one."""
    pipe = build_tiny_pipeline("wan")
    one = ScheduleSearch(pipe, ["a fox"], STEPS, call_kwargs=call_kwargs())
    two = ScheduleSearch(pipe, ["a fox"], STEPS, call_kwargs=call_kwargs(), seeds=2)
    assert len(two.dense) == 2 and torch.equal(two.dense[0], one.dense[0])
    assert not torch.equal(two.dense[1], two.dense[0])
    assert two.runs == [("a fox", 0), ("a fox", 1000)]
    with pytest.raises(ValueError, match="seeds must be at least 1"):
        ScheduleSearch(pipe, ["a fox"], STEPS, call_kwargs=call_kwargs(), seeds=0)
