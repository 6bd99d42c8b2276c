"""``accel bench solvers``: rows against an Euler teacher, DSS artifacts used or honestly skipped."""
import json
import math

import pytest

import accel
from accel.cli import main as cli_main
from accel.distill.solver_search import SearchOptions, search
from accel.eval.bench_solvers import main
from accel.pipelines.reference import data
from accel.pipelines.tiny import build_tiny_pipeline, tiny_call_kwargs
from accel.base.adapter import config_fingerprint
from accel.solvers.learned import DSSArtifact

TEACHER_STEPS = 6


@pytest.fixture(scope="module")
def tiny_wan():
    return build_tiny_pipeline("wan", seed=0)


def searched_artifact(pipe, steps):
    """A real (if minimal) DSS search on the tiny model: what the benchmark reads in practice."""
    k = tiny_call_kwargs("wan")
    options = SearchOptions(prompts=(data.caption(data.held_out_specs()[0]),), teacher_steps=4, iterations=2,
                            batch_size=1, negative_prompt=k["negative_prompt"], height=k["height"], width=k["width"],
                            num_frames=k["num_frames"], guidance_scale=k["guidance_scale"],
                            max_sequence_length=k["max_sequence_length"])
    return search(pipe, [steps], options)[steps]


def euler_equivalent_artifact(pipe, steps):
    """Zero mixing coefficients on the very sigmas the Euler swap runs: DSS must then equal Euler."""
    with accel.patched(pipe, solver={"name": "euler", "steps": steps}):
        pipe.scheduler.set_timesteps(steps)
        sigmas = [float(s) for s in pipe.scheduler.sigmas]
    return DSSArtifact(model_class=type(pipe.transformer).__name__, model_fingerprint=config_fingerprint([pipe.transformer]),
                       steps=steps, sigmas=tuple(sigmas), coefficients=tuple((0.0,) * i for i in range(steps)))


def tiny_args(out, dss, step_counts=("2", "3", str(TEACHER_STEPS)), solvers=("euler", "unipc", "dss")):
    return ["--model", "tiny", "--prompts", "1", "--threads", "1", "--teacher-steps", str(TEACHER_STEPS),
            "--step-counts", *step_counts, "--solvers", *solvers, "--dss", str(dss), "--json", str(out)]


def test_rows_against_the_teacher(tiny_wan, tmp_path, capsys):
    dss = tmp_path / "dss"
    dss.mkdir()
    searched_artifact(tiny_wan, 2).save(str(dss / "dss-2.json"))
    euler_equivalent_artifact(tiny_wan, 3).save(str(dss / "dss-3.json"))  # no dss-6.json: that row is skipped
    out = tmp_path / "result.json"

    assert main(tiny_args(out, dss)) == 0
    result = json.loads(out.read_text())
    assert set(result) == {"what", "environment", "workload", "teacher", "rows"}
    teacher = result["teacher"]
    assert (teacher["solver"], teacher["steps"], teacher["model_evals"]) == ("euler", TEACHER_STEPS, TEACHER_STEPS)
    assert teacher["wall_seconds"] > 0 and "prompt_accuracy" in teacher

    rows = {(r["solver"], r["steps"]): r for r in result["rows"]}
    assert [(r["solver"], r["steps"]) for r in result["rows"]] == [
        (s, n) for s in ("euler", "unipc", "dss") for n in (2, 3, TEACHER_STEPS)]
    for key, row in rows.items():
        if key == ("dss", TEACHER_STEPS):
            continue
        assert isinstance(row["psnr"], float) and math.isfinite(row["psnr"]), key
        assert isinstance(row["ssim"], float) and -1 <= row["ssim"] <= 1, key
        assert row["prompt_accuracy"] is None, key  # the judge applies to the reference model only
        assert isinstance(row["wall_seconds"], float) and row["wall_seconds"] > 0, key
        assert isinstance(row["speedup"], float) and row["speedup"] > 0, key
        assert row["model_evals"] == key[1], key

    # Euler at the teacher's step count is the teacher; fewer steps or another solver are not.
    assert rows[("euler", TEACHER_STEPS)]["psnr"] == 100.0
    assert rows[("euler", 2)]["psnr"] < rows[("euler", 3)]["psnr"] < 100.0
    assert rows[("unipc", TEACHER_STEPS)]["psnr"] < 100.0

    euler_like = rows[("dss", 3)]
    assert euler_like["psnr"] == pytest.approx(rows[("euler", 3)]["psnr"], abs=1e-2)
    assert euler_like["psnr"] != pytest.approx(rows[("euler", 2)]["psnr"], abs=1e-2)
    assert euler_like["params"] == 6 and euler_like["artifact"].endswith("dss-3.json")
    assert "search_cpu_minutes" not in euler_like  # that artifact records no search: nothing is made up

    fitted = rows[("dss", 2)]
    assert fitted["params"] == 3 and fitted["search_cpu_minutes"] >= 0 and fitted["search_teacher_cpu_minutes"] >= 0

    skipped = rows[("dss", TEACHER_STEPS)]
    assert set(skipped) == {"solver", "steps", "skipped"} and "dss-6.json" in skipped["skipped"]

    printed = capsys.readouterr().out
    assert "| euler (teacher) | 6 |" in printed and "| dss | 6 | skipped: no artifact" in printed


def test_artifact_for_another_step_count_or_model_fails_before_generating(tiny_wan, tmp_path, capsys):
    dss = tmp_path / "dss"
    dss.mkdir()
    euler_equivalent_artifact(tiny_wan, 2).save(str(dss / "dss-3.json"))
    out = tmp_path / "result.json"
    assert cli_main(["bench", "solvers", *tiny_args(out, dss, step_counts=("3",), solvers=("dss",))]) == 2
    assert "fitted for 2 steps" in capsys.readouterr().err
    assert not out.exists()

    other = euler_equivalent_artifact(tiny_wan, 3)
    DSSArtifact(model_class=other.model_class, model_fingerprint="0" * 16, steps=3, sigmas=other.sigmas,
                coefficients=other.coefficients).save(str(dss / "dss-3.json"))
    assert main(tiny_args(out, dss, step_counts=("3",), solvers=("dss",))) == 2
    assert "fitted for another WanTransformer3DModel" in capsys.readouterr().err
    assert not out.exists()


def test_student_rows_count_evaluations_and_time_the_transformer_part(tiny_wan, tmp_path):
    """A student distilled from the tiny model gets one row per distilled step count, with one
    evaluation per step (no uncond branch) where the teacher and Euler count both branches."""
    from accel.distill.flow_map import main as distill

    student = tmp_path / "student"
    assert distill(["--teacher", "tiny:wan", "--steps", "1", "2", "--out", str(student), "--prompts", "1",
                    "--teacher-steps", "4", "--iterations", "2", "--batch-size", "1", "--threads", "1",
                    "--no-progress"]) == 0
    out = tmp_path / "result.json"
    args = tiny_args(out, tmp_path, step_counts=("2",), solvers=("euler", "flowmap"))
    assert main([*args, "--flowmap", str(student)]) == 0
    result = json.loads(out.read_text())
    assert result["teacher"]["evaluations"] == 2 * TEACHER_STEPS  # both CFG branches
    rows = {(r["solver"], r["steps"]): r for r in result["rows"]}
    assert rows[("euler", 2)]["evaluations"] == 4
    assert rows[("flowmap", 1)]["evaluations"] == 1 and rows[("flowmap", 2)]["evaluations"] == 2
    assert all(math.isfinite(rows[("flowmap", n)]["psnr"]) for n in (1, 2))
    speed = result["speed"]
    assert [s["steps"] for s in speed["students"]] == [1, 2] and speed["vae_decode_seconds"] is not None
    assert all(s["student_transformer_seconds"] > 0 and s["transformer_speedup"] > 0 for s in speed["students"])


def test_student_rows_are_skipped_honestly_without_a_student(tmp_path):
    out = tmp_path / "result.json"
    assert main(tiny_args(out, tmp_path, step_counts=("2",), solvers=("flowmap",))) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["solver"] == "flowmap" and "no student shipped" in row["skipped"]
