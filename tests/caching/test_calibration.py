"""Calibration: fitted artifacts load, drive the rules, change behaviour, and refuse a mismatch."""
import json

import pytest

import accel
from accel.caching import MagCacheConfig, TeaCacheConfig, load_calibration
from accel.distill.cache_calibration import calibrate_magcache, calibrate_teacache, fit_polynomial, main
from accel.pipelines.tiny import build_tiny_pipeline, tiny_call_kwargs

PROMPTS = ["a red fox runs in the snow", "a bird flies over the ocean"]
STEPS = 5


def call_kwargs(family):
    kwargs = tiny_call_kwargs(family, steps=STEPS)
    kwargs.pop("prompt")
    return kwargs


def test_fit_polynomial_recovers_a_quartic():
    coefficients = [3.0, -2.0, 0.5, 0.1, 0.01]
    xs = [0.05 * i for i in range(1, 12)]
    pairs = [(x, sum(c * x ** (4 - i) for i, c in enumerate(coefficients))) for x in xs]
    fitted, rmse = fit_polynomial(pairs)
    assert fitted == pytest.approx(coefficients, rel=1e-5, abs=1e-7) and rmse < 1e-8
    padded, _ = fit_polynomial([(0.1, 1.0), (0.2, 2.0)])  # two points: a line, padded to 5 coefficients
    assert padded == pytest.approx([0, 0, 0, 10.0, 0], abs=1e-9)
    with pytest.raises(ValueError, match="too few"):
        fit_polynomial([(0.1, 1.0)])


def test_teacache_calibration_fits_loads_and_drives_the_rule(tmp_path, helpers):
    pipe = build_tiny_pipeline("wan")
    path = tmp_path / "teacache.json"
    artifact = calibrate_teacache(pipe, PROMPTS, STEPS, call_kwargs=call_kwargs("wan"), out=str(path))
    assert artifact["model_class"] == "WanTransformer3DModel" and artifact["num_steps"] == STEPS
    assert artifact["token_grid"] == [3, 4, 4] and artifact["resolution"]["height"] == 64
    # 2 prompts x 2 branches x (STEPS - 1) consecutive pairs
    assert len(artifact["coefficients"]) == 5 and artifact["fit"]["pairs"] == 2 * 2 * (STEPS - 1)
    assert json.loads(path.read_text())["coefficients"] == artifact["coefficients"]
    with accel.patched(pipe, cache=TeaCacheConfig(threshold=0.1, calibration=str(path))) as handle:
        assert handle.methods["cache"].engine.rule.coefficients == tuple(artifact["coefficients"])
        helpers.run(pipe, "wan", STEPS)


def test_magcache_calibration_has_per_branch_ratios(tmp_path, helpers):
    pipe = build_tiny_pipeline("wan")
    path = tmp_path / "magcache.json"
    artifact = calibrate_magcache(pipe, PROMPTS, STEPS, call_kwargs=call_kwargs("wan"), out=str(path))
    assert set(artifact["ratios"]) == {"cond", "uncond"}
    assert all(len(r) == STEPS and r[0] == 1.0 and min(r) > 0 for r in artifact["ratios"].values())
    loaded = load_calibration(str(path), "magcache", model_class="WanTransformer3DModel", num_steps=STEPS)
    with accel.patched(pipe, cache=MagCacheConfig(threshold=0.5, calibration=loaded)) as handle:
        helpers.run(pipe, "wan", STEPS)
        assert sum(helpers.counters(handle)["steps_reused"].values()) > 0


@pytest.mark.parametrize("kind,reusing,computing", [("teacache", 0.0, 1e9), ("magcache", 1.0, 3.0)])
def test_calibration_changes_behaviour(kind, reusing, computing, helpers):
    pipe = build_tiny_pipeline("flux")
    make = TeaCacheConfig if kind == "teacache" else MagCacheConfig
    fractions = []
    for value in (reusing, computing):
        calibration = helpers.calibration(kind, "FluxTransformer2DModel", STEPS, value)
        with accel.patched(pipe, cache=make(threshold=0.5, calibration=calibration)) as handle:
            helpers.run(pipe, "flux", STEPS)
            fractions.append(helpers.counters(handle)["compute_fraction"])
    assert fractions[0] < 1.0 and fractions[1] == 1.0


def test_mismatched_artifacts_are_refused(helpers):
    pipe = build_tiny_pipeline("flux")
    wan = helpers.calibration("magcache", "WanTransformer3DModel", STEPS, 1.0)
    with pytest.raises(ValueError, match="fitted for WanTransformer3DModel, not FluxTransformer2DModel"):
        accel.patch(pipe, cache=MagCacheConfig(calibration=wan))
    flux = helpers.calibration("teacache", "FluxTransformer2DModel", STEPS, 0.0)
    with accel.patched(pipe, cache=TeaCacheConfig(calibration=flux)):
        with pytest.raises(ValueError, match=f"fitted for {STEPS} steps, this run has 3"):
            helpers.run(pipe, "flux", 3)
    with pytest.raises(ValueError, match="magcache needs a calibration"):
        accel.patch(pipe, cache="magcache")


def test_calibrate_command(tmp_path, capsys):
    out = tmp_path / "ltx.json"
    args = ["--model", "tiny:ltx", "--prompts", "1", "--steps", "4", "--out", str(out)]
    assert main(["--cache", "magcache", *args]) == 0
    assert "LTXVideoTransformer3DModel" in capsys.readouterr().out
    assert load_calibration(str(out), "magcache").ratios.keys() == {"cond_uncond"}
    assert main(["--cache", "teacache", "--model", "tiny:nope", "--steps", "4", "--out", str(out)]) == 2
    assert "unknown tiny family" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: --prompts must be >= 1 (tests/test_cli_errors.py has the table)
        main(["--cache", "teacache", "--model", "tiny:ltx", "--prompts", "0", "--steps", "4", "--out", str(out)])
    with pytest.raises(SystemExit):
        main(["--cache", "pab", "--model", "tiny:ltx", "--steps", "4", "--out", str(out)])


def test_cli_calibrates_the_reference_model_at_its_own_size(tmp_path, capsys):
    # --model reference runs the reference defaults (1,024 tokens), not WanPipeline's 480p default
    from accel.pipelines.reference import build

    weights = tmp_path / "ref"
    build.build_reference_pipeline().save_pretrained(str(weights))  # untrained: the CLI path, not the fit
    out = tmp_path / "ref-magcache.json"
    assert main(["--cache", "magcache", "--model", "reference", "--weights", str(weights), "--prompts", "1",
                 "--steps", "3", "--out", str(out)]) == 0
    artifact = json.loads(out.read_text())
    assert artifact["token_grid"] == [8, 8, 16] and artifact["num_steps"] == 3
    assert sorted(artifact["ratios"]) == ["cond", "uncond"]  # the reference default guides (scale 4)
    assert main(["--cache", "magcache", "--model", "tiny:wan", "--weights", str(weights), "--steps", "3",
                 "--out", str(out)]) == 2
    assert "--weights goes with --model reference" in capsys.readouterr().err


def test_a_calibration_for_another_config_of_the_same_class_is_refused(tmp_path):
    # fitted on tiny Wan, applied to a Wan transformer with another architecture config
    pipe = build_tiny_pipeline("wan")
    path = tmp_path / "magcache.json"
    artifact = calibrate_magcache(pipe, PROMPTS[:1], STEPS, call_kwargs=call_kwargs("wan"), out=str(path))
    assert artifact["model_fingerprint"]
    accel.patch(pipe, cache=MagCacheConfig(calibration=str(path))).remove()  # same model: accepted
    other = build_tiny_pipeline("wan")
    other.transformer.register_to_config(ffn_dim=other.transformer.config.ffn_dim * 2)
    with pytest.raises(ValueError, match="another WanTransformer3DModel"):
        accel.patch(other, cache=MagCacheConfig(calibration=str(path)))


GOOD = {"teacache": {"kind": "teacache", "model_class": "WanTransformer3DModel", "num_steps": 2,
                     "coefficients": [1.0, 0.0]},
        "magcache": {"kind": "magcache", "model_class": "WanTransformer3DModel", "num_steps": 2,
                     "ratios": {"cond": [1.0, 0.9]}}}


@pytest.mark.parametrize("kind, content, message", [
    ("teacache", b"\x89PNG\r\n\x1a\n\x00\xff", "is not a text file"),
    ("teacache", b"null", "must hold a JSON object, got NoneType"),
    ("magcache", b"42", "must hold a JSON object, got int"),
    ("magcache", None, "is a folder, not a JSON file"),
    ("teacache", {"num_steps": True}, "num_steps must be an integer, got True"),
    ("teacache", {"num_steps": "25"}, "num_steps must be an integer, got '25'"),
    ("teacache", {"coefficients": "1.0"}, "coefficients must be a list of numbers, got str"),
    ("teacache", {"coefficients": [1e308, 0.0]}, "coefficients must be finite numbers of magnitude"),
    ("teacache", {"model_class": None}, "model_class must be a class name, got None"),
    ("magcache", {"ratios": {"cond": [1.0, 0.0]}}, r"ratios\['cond'\] must be positive, got 0.0"),
    ("magcache", {"ratios": {"cond": [1.0, -1]}}, r"ratios\['cond'\] must be positive, got -1"),
    ("magcache", {"ratios": {"cond": [1.0, "x"]}}, r"ratios\['cond'\] must be numbers, got 'x'"),
])
def test_corrupt_calibrations_are_refused_naming_file_and_field(tmp_path, kind, content, message):
    path = tmp_path / f"{kind}-2.json"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content if isinstance(content, bytes) else json.dumps({**GOOD[kind], **content}).encode())
    config = {"teacache": TeaCacheConfig, "magcache": MagCacheConfig}[kind](calibration=str(path))
    with pytest.raises(ValueError, match=f"calibration {path}.*{message}"):
        accel.patch(build_tiny_pipeline("wan"), cache=config)
