"""The fitted forecast: its fit (on the cache's own states), its artifact, and the cache running it."""
import json

import pytest
import torch

import accel
from accel.caching import FixedCacheConfig, load_calibration
from accel.caching.configs import MagCacheConfig
from accel.distill.cache_calibration import artifact_meta, main
from accel.distill.forecast_fit import BLEND_SHARES, blend, fit_forecast
from accel.distill.schedule_search import MIN_GAIN_DB
from accel.pipelines.tiny import build_tiny_pipeline, tiny_call_kwargs

STEPS = 6
SCHEDULE = [0, 2, 4]
PROMPTS = ["a fox", "a red car"]


def call_kwargs():
    return {k: v for k, v in tiny_call_kwargs("wan", steps=STEPS).items()
            if k not in ("prompt", "generator", "num_inference_steps", "output_type")}


def base(pipe):
    with accel.patched(pipe, cache=FixedCacheConfig()) as handle:
        return artifact_meta(handle.session, STEPS, call_kwargs(), len(PROMPTS), 0, 0)


def fitted_artifact(pipe, branches):
    return {**base(pipe), "kind": "fixed", "compute_steps": SCHEDULE, "forecast": "fitted", "order": 2,
            "weights": {"residuals": 3, "inputs": 2, "branches": branches}}


def test_fit_weighs_every_skipped_step_of_each_branch_and_never_fits_worse_than_taylorseer():
    pipe = build_tiny_pipeline("wan")
    runs = [(p, i) for i, p in enumerate(PROMPTS)]
    weights, report = fit_forecast(pipe, runs, STEPS, SCHEDULE, call_kwargs=call_kwargs(), base=base(pipe))
    assert weights["residuals"] == 3 and weights["inputs"] == 2 and set(weights["branches"]) == {"cond", "uncond"}
    for branch, steps in weights["branches"].items():
        # step 1 sees one computed step (1 residual, 1 input move), step 3 two, step 5 three (3 + 2)
        assert {s: len(w) for s, w in steps.items()} == {"1": 2, "3": 4, "5": 5}
        for step, errors in report[branch].items():
            # TaylorSeer's weights are one point of the least-squares problem the fit solves
            assert errors["fitted"] <= errors["taylorseer"] + 1e-6, (branch, step, errors)
    assert any(e["fitted"] < 0.9 * e["taylorseer"] for b in report.values() for e in b.values()), report
    # share 1 is the fit, share 0 TaylorSeer's weights (residuals only), a half share halfway
    assert blend(weights, report, 1.0)["branches"] == weights["branches"]
    alone = blend(weights, report, 0.0)["branches"]["cond"]
    # reuse, then the line and the expansion at a lead of half a gap (steps 0, 2, 4 computed)
    assert alone["1"] == [1.0, 0.0] and alone["3"] == [1.5, -0.5, 0.0, 0.0]
    assert alone["5"] == pytest.approx([1.625, -0.75, 0.125, 0.0, 0.0])
    half = blend(weights, report, 0.5)["branches"]["uncond"]["5"]
    assert half == pytest.approx([(a + b) / 2 for a, b in zip(weights["branches"]["uncond"]["5"],
                                                              [1.625, -0.75, 0.125, 0.0, 0.0])])


def test_the_first_step_weights_are_the_least_squares_fit_of_the_dense_states():
    """Before step 1 only step 0 computes, so step 1's samples are the dense run's: the fitted weights
    must be lstsq([R0, X1 - X0] -> R1) over both prompts, tokens and channels, computed here apart."""
    pipe = build_tiny_pipeline("wan")
    runs = [(p, i) for i, p in enumerate(PROMPTS)]
    weights, _ = fit_forecast(pipe, runs, STEPS, SCHEDULE, call_kwargs=call_kwargs(), base=base(pipe))
    rows, targets = [], []
    for prompt, seed in runs:
        seen = {}
        handle = accel.patch(pipe, cache=FixedCacheConfig(compute_steps=tuple(range(STEPS)), interval=1))
        handle.methods["cache"].engine.observers.append(
            lambda r: seen.setdefault((r.probe.branch, r.probe.step), (r.span_input["hidden_states"],
                                                                        r.span_output["hidden_states"])))
        with torch.no_grad():
            pipe(prompt=prompt, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(seed),
                 output_type="latent", **call_kwargs())
        handle.remove()
        (x0, y0), (x1, y1) = seen[("cond", 0)], seen[("cond", 1)]
        rows.append(torch.stack([(y0 - x0).flatten(), (x1 - x0).flatten()], dim=1))
        targets.append((y1 - x1).flatten())
    expected = torch.linalg.lstsq(torch.cat(rows).double(), torch.cat(targets).double()).solution
    torch.testing.assert_close(torch.tensor(weights["branches"]["cond"]["1"], dtype=torch.float64), expected,
                               rtol=1e-4, atol=1e-6)


def test_plain_reuse_weights_give_the_forecast_none_output_bit_for_bit_and_remove_restores(helpers):
    pipe = build_tiny_pipeline("wan")
    dense = helpers.run(pipe, "wan", steps=STEPS)
    reuse = {"1": [1.0, 0.0], "3": [1.0, 0.0, 0.0, 0.0], "5": [1.0, 0.0, 0.0, 0.0, 0.0]}
    handle = accel.patch(pipe, cache=FixedCacheConfig(forecast="fitted", calibration=fitted_artifact(
        pipe, {"cond": reuse, "uncond": reuse})))
    fitted = helpers.run(pipe, "wan", steps=STEPS)
    counters = helpers.counters(handle)
    handle.remove()
    assert counters["forecast"] == "fitted" and counters["steps_reused"] == {"cond": 3, "uncond": 3}, counters
    with accel.patched(pipe, cache=FixedCacheConfig(compute_steps=tuple(SCHEDULE), forecast="none")):
        plain = helpers.run(pipe, "wan", steps=STEPS)
    assert torch.equal(fitted, plain) and not torch.equal(fitted, dense)
    assert torch.equal(helpers.run(pipe, "wan", steps=STEPS), dense)


def test_calibrate_command_fits_the_forecast_on_a_searched_or_given_schedule(tmp_path, capsys, helpers):
    out, refit = tmp_path / "fixed-fitted.json", tmp_path / "refit.json"
    args = ["--cache", "fixed", "--model", "tiny:wan", "--prompts", "1", "--steps", str(STEPS), "--forecast", "fitted"]
    assert main([*args, "--budget", "3", "--max-evaluations", "3", "--out", str(out)]) == 0
    assert "fitted forecast weights for 6 (step, branch) pairs" in capsys.readouterr().out
    artifact = load_calibration(str(out), "fixed")
    assert artifact.meta["forecast"] == "fitted" and set(artifact.weights.branches) == {"cond", "uncond"}
    # the share kept is the best-scoring one on the calibration runs when it gains MIN_GAIN_DB over
    # TaylorSeer alone (share 0), else share 0
    fit, scores = artifact.meta["fit"], artifact.meta["fit"]["share_scores_db"]
    assert set(scores) == {str(s) for s in BLEND_SHARES}
    best = max(scores, key=scores.get)
    assert fit["share"] == (float(best) if scores[best] > scores["0.0"] + MIN_GAIN_DB else 0.0), fit
    assert main([*args, "--schedule", str(out), "--inputs", "0", "--out", str(refit)]) == 0
    refitted = json.loads(refit.read_text())
    assert refitted["compute_steps"] == list(artifact.compute_steps) and refitted["weights"]["inputs"] == 0
    pipe = build_tiny_pipeline("wan")
    with accel.patched(pipe, cache=FixedCacheConfig(forecast="fitted", calibration=str(refit))) as handle:
        helpers.run(pipe, "wan", steps=STEPS)
        assert helpers.counters(handle)["forecast"] == "fitted"
    assert main([*args[:-1], "taylorseer", "--schedule", str(out), "--out", str(refit)]) == 2
    assert "--schedule goes with --forecast fitted" in capsys.readouterr().err


@pytest.mark.parametrize("change, message", [
    (lambda a: a.pop("weights"), "forecast 'fitted' needs weights"),
    (lambda a: a.update(forecast="taylorseer"), "weights go with forecast 'fitted', not 'taylorseer'"),
    (lambda a: a["weights"]["branches"]["cond"].update({"2": [1.0]}), "step 2, which the schedule computes"),
    (lambda a: a["weights"]["branches"]["cond"].update({"3": [1.0] * 6}), r"6 weights; 1 to 5"),
    (lambda a: a["weights"]["branches"]["cond"].update({"x": [1.0]}), "step 'x', not a step index"),
    (lambda a: a["weights"].update(residuals=0), r"weights.residuals must be in \[1, 8\]"),
])
def test_corrupt_fitted_artifacts_are_refused_naming_the_field(tmp_path, change, message):
    pipe = build_tiny_pipeline("wan")
    artifact = fitted_artifact(pipe, {"cond": {"1": [1.0, 0.0]}})
    change(artifact)
    path = tmp_path / "fixed-6-3.json"
    path.write_text(json.dumps(artifact))
    with pytest.raises(ValueError, match=message):
        accel.patch(pipe, cache=FixedCacheConfig(forecast="fitted", calibration=str(path)))


def test_configs_refuse_a_fitted_forecast_they_cannot_run():
    with pytest.raises(ValueError, match="MagCacheConfig.forecast must be one of .*'foca'"):
        MagCacheConfig(forecast="fitted")
    for fields in ({"schedule": "uniform"}, {"compute_steps": (0, 2)}):
        with pytest.raises(ValueError, match="forecast='fitted' takes its weights from a fitted schedule"):
            FixedCacheConfig(forecast="fitted", **fields)
    pipe = build_tiny_pipeline("wan")
    schedule_only = {**base(pipe), "kind": "fixed", "compute_steps": SCHEDULE, "forecast": "taylorseer", "order": 2}
    with pytest.raises(ValueError, match="needs a fitted artifact; <dict> holds a schedule for forecast 'taylorseer'"):
        accel.patch(pipe, cache=FixedCacheConfig(forecast="fitted", calibration=schedule_only))
