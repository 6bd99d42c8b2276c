"""Learned DSS solver: a deterministic search on a tiny case, artifacts checked before use."""
import json

import numpy as np
import pytest
import torch

import accel
from accel.distill.solver_search import SearchOptions, WanFlow, main, rollout, search
from accel.pipelines.tiny import build_tiny_pipeline, tiny_call_kwargs
from accel.solvers.learned import DSSArtifact, DSSConfig, dss_velocity

TINY = dict(prompts=("a red fox runs in the snow", "a blue car drives at night"), seeds_per_prompt=1,
            teacher_steps=6, iterations=4, lr=0.05, batch_size=2, seed=0)


def _options():
    kwargs = tiny_call_kwargs("wan")
    return SearchOptions(**TINY, negative_prompt=kwargs["negative_prompt"], height=kwargs["height"],
                         width=kwargs["width"], num_frames=kwargs["num_frames"],
                         guidance_scale=kwargs["guidance_scale"], max_sequence_length=kwargs["max_sequence_length"])


@pytest.fixture(scope="module")
def wan():
    return build_tiny_pipeline("wan")


@pytest.fixture(scope="module")
def fitted(wan, tmp_path_factory):
    artifact = search(wan, [2], _options())[2]
    path = tmp_path_factory.mktemp("dss") / "wan-2.json"
    artifact.save(str(path))
    return artifact, str(path)


def _numbers(artifact):
    return artifact.sigmas, artifact.coefficients, artifact.fit["endpoint_mse"]


def test_search_is_deterministic_and_never_worse_than_euler(wan, fitted):
    artifact, _ = fitted
    again = search(wan, [2], _options())[2]
    assert _numbers(again) == _numbers(artifact)
    mse = artifact.fit["endpoint_mse"]
    assert mse["dss"] <= mse["euler"]
    assert artifact.fit["improved"] and artifact.coefficients[1][0] != 0, "the tiny search must move off Euler"
    assert artifact.parameter_count == 3 and artifact.steps == 2
    assert artifact.sigmas[0] == 1.0 and artifact.sigmas[-1] == 0.0
    assert not any(p.requires_grad for p in wan.transformer.parameters()), "search restores requires_grad"


def test_artifact_round_trip(fitted):
    artifact, path = fitted
    loaded = DSSArtifact.load(path)
    assert loaded == artifact and loaded.fit == json.loads(json.dumps(artifact.fit))


def test_scheduler_applies_the_artifact_as_the_search_fitted_it(wan, fitted, run_latents):
    artifact, path = fitted
    options = _options()
    prompt = options.prompts[0]
    noise = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    with accel.patched(wan, solver=DSSConfig(artifact=path)) as handle:
        out = run_latents(wan, "wan", steps=25, prompt=prompt, latents=noise.clone())
        assert handle.step.num_steps == 2, "the artifact's step count, whatever the pipeline asks"
    flow = WanFlow(wan, options)
    with torch.no_grad():
        coefficients = torch.zeros(2, 2)
        coefficients[1, 0] = artifact.coefficients[1][0]
        expected = rollout(flow, noise, torch.tensor([0]), torch.tensor(artifact.sigmas, dtype=torch.float64),
                           coefficients)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)  # batched CFG in the search


def test_zero_coefficients_are_euler_on_the_same_sigmas(wan, run_latents, tmp_path):
    sigmas = (1.0, 0.8, 0.45, 0.0)
    euler_like = DSSArtifact(model_class="WanTransformer3DModel", model_fingerprint="x", steps=3, sigmas=sigmas,
                             coefficients=((), (0.0,), (0.0, 0.0)))
    path = tmp_path / "euler.json"
    euler_like.save(str(path))
    with accel.patched(wan, solver=DSSConfig(artifact=str(path), check_model=False)):
        dss = run_latents(wan, "wan")
    with accel.patched(wan, solver={"name": "euler", "sigmas": sigmas[:-1]}):
        euler = run_latents(wan, "wan")
    torch.testing.assert_close(dss, euler, atol=1e-6, rtol=0)


def test_dss_velocity_formula():
    v = [torch.tensor(1.0), torch.tensor(2.0), torch.tensor(4.0)]
    c = [0.5, -0.25]
    assert float(dss_velocity(v, c)) == pytest.approx(0.5 * 1 - 0.25 * 2 + (1 - 0.25) * 4)
    assert float(dss_velocity(v[:1], [])) == 1.0


def test_artifacts_for_another_model_or_step_count_are_refused(fitted, tmp_path):
    artifact, path = fitted
    wan = build_tiny_pipeline("wan")
    with pytest.raises(ValueError, match=r"DSSConfig.steps is 4 but artifact .* was fitted for 2 steps"):
        accel.patch(wan, solver=DSSConfig(artifact=path, steps=4))
    data = json.loads(open(path).read())
    other = tmp_path / "flux.json"
    other.write_text(json.dumps(dict(data, model_class="FluxTransformer2DModel")))
    with pytest.raises(ValueError, match="fitted for FluxTransformer2DModel, not WanTransformer3DModel"):
        accel.patch(wan, solver=DSSConfig(artifact=str(other)))
    assert "_accel_handle" not in vars(wan)
    # Wan 2.2 has the same transformer class but two experts: another model, another fingerprint.
    wan22 = build_tiny_pipeline("wan22")
    with pytest.raises(ValueError, match="fitted for another WanTransformer3DModel"):
        accel.patch(wan22, solver=DSSConfig(artifact=path))
    accel.patch(wan22, solver=DSSConfig(artifact=path, check_model=False)).remove()


@pytest.mark.parametrize("edit, message", [
    (lambda d: dict(d, format="other"), "not a DSS solver artifact"),
    (lambda d: dict(d, version=99), "artifact version 99"),
    (lambda d: dict(d, sigmas=[1.0, 0.7]), r"sigmas must have steps \+ 1 = 3 entries"),
    (lambda d: dict(d, sigmas=[1.0, 1.2, 0.0]), "must decrease strictly"),
    (lambda d: dict(d, sigmas=[1.0, "x", 0.0]), "sigmas must be numbers, got 'x'"),
    (lambda d: dict(d, sigmas=[[1.0], [0.5], [0.0]]), r"sigmas must be numbers, got \[1.0\]"),
    (lambda d: dict(d, coefficients=[[], []]), "lower-triangular rows"),
    (lambda d: dict(d, coefficients=[[], [1e308]]), "coefficients\\[1\\] must be finite numbers of magnitude"),
    (lambda d: dict(d, steps=True), "steps must be an integer, got True"),
    (lambda d: dict(d, model_class=7), "model_class must be a non-empty string"),
    (lambda d: {k: v for k, v in d.items() if k != "steps"}, "lacks the field 'steps'"),
])
def test_malformed_artifacts_are_refused_naming_file_and_field(fitted, tmp_path, edit, message):
    _, path = fitted
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(edit(json.loads(open(path).read()))))
    config = DSSConfig(artifact=str(bad))  # a value: nothing is read yet
    with pytest.raises(ValueError, match=f"DSS artifact {bad}: .*{message}"):
        accel.patch(build_tiny_pipeline("wan"), solver=config)


@pytest.mark.parametrize("content, message", [
    (b"\x89PNG\r\n\x1a\n\x00\xff", "is not a text file"),
    (b"null", "must hold a JSON object, got NoneType"),
    (b"42", "must hold a JSON object, got int"),
    (b"{\"format\": ", "is not valid JSON"),
    (None, "is a folder, not a JSON file"),
])
def test_unreadable_artifact_files_are_refused_naming_the_file(tmp_path, content, message):
    bad = tmp_path / "dss-4.json"
    if content is None:
        bad.mkdir()
    else:
        bad.write_bytes(content)
    with pytest.raises(ValueError, match=f"DSS artifact {bad}.*{message}"):
        DSSArtifact.load(str(bad))


def test_missing_artifact_bare_name_and_flag_types(wan):
    with pytest.raises(ValueError, match="DSS artifact /nonexistent/dss.json does not exist"):
        accel.patch(wan, solver=DSSConfig(artifact="/nonexistent/dss.json"))
    with pytest.raises(ValueError, match="solver 'dss' needs an artifact fitted for this WanTransformer3DModel, "
                                         "and none is shipped for it"):
        accel.patch(wan, solver="dss")  # the tiny Wan has no shipped artifact
    with pytest.raises(ValueError, match="DSSConfig.artifact must be the path"):
        DSSConfig(artifact=3)
    with pytest.raises(ValueError, match="DSSConfig.check_model must be True or False, got 'no'"):
        DSSConfig(artifact="x.json", check_model="no")
    with pytest.raises(ValueError, match="DSSConfig.steps must be in"):
        DSSConfig(artifact="x.json", steps=10**12)


def test_cli_writes_one_artifact_per_step_count_and_reports_errors(tmp_path, capsys):
    out = str(tmp_path / "dss-{steps}.json")
    code = main(["--solver", "dss", "--steps", "1", "2", "--model", "tiny:wan", "--out", out, "--prompts", "1",
                 "--teacher-steps", "4", "--iterations", "1"])
    assert code == 0
    for n in (1, 2):
        assert DSSArtifact.load(out.format(steps=n)).steps == n
    assert main(["--steps", "2", "3", "--model", "tiny:wan", "--out", str(tmp_path / "x.json")]) == 2
    assert main(["--steps", "2", "--model", "tiny:flux", "--out", str(tmp_path / "x.json")]) == 2
    assert "Wan-like" in capsys.readouterr().err
    assert main(["--steps", "2", "--model", "tiny:wan", "--weights", str(tmp_path), "--out", out]) == 2
    assert "--weights goes with --model reference" in capsys.readouterr().err
    assert main(["--steps", "2", "--model", "reference", "--weights", str(tmp_path), "--out", out]) == 2
    assert "model_index.json" in capsys.readouterr().err  # an empty folder is not a trained run


def test_learned_sigmas_stay_monotone():
    from accel.distill.solver_search import _student_sigmas

    sigmas = _student_sigmas(torch.tensor([3.0, -2.0, 0.5, 0.0]))
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0 and bool((np.diff(sigmas.numpy()) < 0).all())


def test_dss_keeps_the_latent_dtype_of_the_pipelines_own_loop(fitted):
    """Wan's UniPC keeps fp32 latents under a bf16 transformer; DSS made them bf16 before."""
    _, path = fitted
    pipe = build_tiny_pipeline("wan", dtype=torch.bfloat16)
    kwargs = {**tiny_call_kwargs("wan", steps=2), "output_type": "latent"}
    own = pipe(**kwargs).frames.dtype
    with accel.patched(pipe, solver={"name": "dss", "artifact": path}):
        out = pipe(**kwargs).frames
    assert own == torch.float32 and out.dtype == own and torch.isfinite(out).all()
