"""Flow-map students: `accel distill` end to end on a tiny Wan, resumed, sampled in N calls."""
import json
import os

import pytest
import torch

import accel
from accel.distill.flow_map import DistillOptions, distill_flow_map, grid_indices, main
from accel.pipelines.tiny import build_tiny_pipeline, tiny_call_kwargs
from accel.solvers.student import StudentArtifact
from accel.solvers.target_time import TargetTimeRoute, target_time_inputs
from accel.api import adapter_for
from accel.base.changes import ChangeLog

TINY = ["--teacher", "tiny:wan", "--prompts", "2", "--teacher-steps", "8", "--batch-size", "2",
        "--threads", "1", "--no-progress"]


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def wan():
    pipe = build_tiny_pipeline("wan")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A student distilled in two runs: 3 iterations, then resumed to 6."""
    out = str(tmp_path_factory.mktemp("student"))
    assert main([*TINY, "--steps", "1", "2", "--out", out, "--iterations", "3", "--save-every", "3"]) == 0
    first = json.load(open(os.path.join(out, "flowmap.json")))
    assert main([*TINY, "--steps", "1", "2", "--out", out, "--iterations", "6", "--save-every", "3"]) == 0
    return out, first


def _call(wan, steps, **patch):
    kwargs = tiny_call_kwargs("wan", steps=steps)
    kwargs.update(output_type="latent")
    return torch.as_tensor(wan(**kwargs).frames)


def test_distill_resumes_and_logs(student):
    out, first = student
    artifact = json.load(open(os.path.join(out, "flowmap.json")))
    assert first["training"]["iterations"] == 3 and artifact["training"]["iterations"] == 6
    losses = [line.split(",") for line in open(os.path.join(out, "loss.csv")).read().split()]
    assert [int(i) for i, _ in losses] == [1, 2, 3, 4, 5, 6], "the resumed run continues the log"
    assert all(float(v) > 0 for _, v in losses)
    assert len(os.listdir(os.path.join(out, "trajectories"))) == 2, "trajectories recorded once, then reused"
    assert sorted(artifact["schedules"]) == ["1", "2"] and artifact["guidance"] == 5.0
    assert artifact["training"]["command"].startswith("accel distill --teacher tiny:wan")
    loaded = StudentArtifact.load(out)
    assert loaded.steps == (1, 2) and loaded.schedules[2][-1] == 0.0


def test_resume_is_the_same_as_one_run(student, tmp_path):
    """3 + 3 iterations give the weights of one 6-iteration run, bit for bit."""
    from safetensors.torch import load_file

    out, _ = student
    assert main([*TINY, "--steps", "1", "2", "--out", str(tmp_path), "--iterations", "6", "--save-every", "3"]) == 0
    name = os.path.join("transformer", "diffusion_pytorch_model.safetensors")
    resumed, straight = load_file(os.path.join(out, name)), load_file(os.path.join(str(tmp_path), name))
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


@pytest.mark.parametrize("steps", [1, 2])
def test_student_samples_in_exactly_n_calls_and_remove_restores(wan, student, call_counter, steps):
    out, _ = student
    teacher = _call(wan, 3)
    handle = accel.patch(wan, solver={"name": "flowmap", "artifact": out, "steps": steps})
    counter = call_counter(wan.transformer)
    try:
        sample = _call(wan, 3)  # the pipeline asks for 3 steps and CFG; the student takes `steps` calls
    finally:
        counter.remove()
        summary = handle.summary()
        handle.remove()
    assert counter.calls == steps and counter.rows == steps
    assert summary["methods"]["solver"]["counters"]["uncond_calls_skipped"] == steps
    assert torch.isfinite(sample).all() and not torch.allclose(sample, teacher)
    assert torch.equal(_call(wan, 3), teacher), "remove() gives the teacher back bit for bit"


def test_full_student_loads_with_from_pretrained(student):
    from diffusers import WanTransformer3DModel

    out, _ = student
    model = WanTransformer3DModel.from_pretrained(os.path.join(out, "transformer"))
    assert type(model).__name__ == "WanTransformer3DModel"


def test_with_r_equal_t_an_untrained_student_is_the_teacher(wan):
    """The mechanism adds nothing when r = t: the first call equals the teacher's velocity exactly,
    and with r != t it does change the output (so the check can fail)."""
    model = wan.transformer
    x = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 16, model.config.text_dim, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([870.0])
    with torch.no_grad():
        teacher = model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
        target = [t]
        changes = ChangeLog()
        TargetTimeRoute(model, target_time_inputs(adapter_for(model), model), 2, lambda: target[0]).install(changes)
        try:
            same = model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
            target[0] = torch.tensor([300.0])
            jumped = model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
        finally:
            changes.undo_all()
        after = model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
    assert torch.equal(same, teacher)
    assert not torch.allclose(jumped, teacher)
    assert torch.equal(after, teacher)


def test_lora_student(tmp_path, call_counter):
    pipe = build_tiny_pipeline("wan")
    pipe.set_progress_bar_config(disable=True)
    before = _state(pipe.transformer)
    kwargs = tiny_call_kwargs("wan")
    options = DistillOptions(steps=(2,), prompts=("a red fox runs in the snow",), guidance=kwargs["guidance_scale"],
                             call_kwargs={k: kwargs[k] for k in ("negative_prompt", "height", "width", "num_frames",
                                                                 "max_sequence_length")},
                             teacher_steps=6, iterations=3, batch_size=2, lr=1e-2, lora_rank=2)
    path = distill_flow_map(pipe, options, str(tmp_path), progress=False, log=lambda m: None)
    after = _state(pipe.transformer)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before), \
        "the teacher is itself again after LoRA training"
    artifact = StudentArtifact.load(path)
    assert artifact.lora["rank"] == 2 and os.path.isfile(os.path.join(str(tmp_path), "lora.safetensors"))
    merged = artifact.student_tensors(pipe.transformer)
    assert merged and all(name.endswith(".weight") for name in merged)
    assert any(not torch.equal(merged[n], before[n]) for n in merged), "3 steps at lr 1e-2 move the factors"
    teacher = _call(pipe, 3)
    handle = accel.patch(pipe, solver={"name": "flowmap", "artifact": str(tmp_path)})
    counter = call_counter(pipe.transformer)
    try:
        _call(pipe, 3)
    finally:
        counter.remove()
        handle.remove()
    assert counter.calls == 2
    assert torch.equal(_call(pipe, 3), teacher)
    with torch.no_grad():  # other weights under the same architecture: the factors mean nothing there
        next(pipe.transformer.parameters()).add_(1.0)
    with pytest.raises(ValueError, match="LoRA factors fitted to other weights"):
        accel.patch(pipe, solver={"name": "flowmap", "artifact": str(tmp_path)})


def test_bad_input_names_the_field(wan, student, tmp_path, capsys):
    out, _ = student
    with pytest.raises(ValueError, match=r"FlowMapConfig.steps is 3.*steps \[1, 2\]"):
        accel.patch(wan, solver={"name": "flowmap", "artifact": out, "steps": 3})
    from accel.pipelines.reference.build import load_reference_pipeline

    with pytest.raises(ValueError, match="distilled from another WanTransformer3DModel"):
        accel.patch(load_reference_pipeline(), solver={"name": "flowmap", "artifact": out})
    with pytest.raises(ValueError, match="serves pipelines with one transformer"):
        accel.patch(build_tiny_pipeline("wan22"), solver={"name": "flowmap", "artifact": out})
    with pytest.raises(ValueError, match="lora_rank"):
        DistillOptions(prompts=("a",), lora_rank=0)
    with pytest.raises(SystemExit):
        main([*TINY, "--steps", "2", "--out", str(tmp_path), "--lora", "0"])
    assert "--lora" in capsys.readouterr().err
    flux = build_tiny_pipeline("flux")
    with pytest.raises(ValueError, match="declares no way to feed a flow-map student"):
        accel.patch(flux, solver={"name": "flowmap", "artifact": out})
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "flowmap.json").write_text(json.dumps({"format": "accel-flowmap", "version": 1}))
    with pytest.raises(ValueError, match="lacks the field 'model_class'"):
        StudentArtifact.load(str(bad))


def test_grid_indices():
    assert grid_indices(50, 2) == [0, 25, 50]
    assert grid_indices(50, 4) == [0, 12, 25, 38, 50]
    assert grid_indices(8, 1) == [0, 8]


def test_two_cpu_processes_share_the_trajectories_and_train_one_student(tmp_path):
    """Under torchrun (what `accelerate launch` runs), on gloo: each process records its share of
    the teacher trajectories, the gradients are averaged, one student is written."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "student"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
               "-m", "accel.cli", "distill", *TINY, "--prompts", "3", "--steps", "2", "--out", str(out),
               "--iterations", "2"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    # both processes write to one pipe, so lines may run together: count the messages, not lines
    assert run.stdout.count("teacher trajectory") == 3, "each trajectory recorded once, by one of the two processes"
    artifact = json.load(open(out / "flowmap.json"))
    assert artifact["training"]["processes"] == 2 and artifact["training"]["iterations"] == 2
    assert len(os.listdir(out / "trajectories")) == 3


def test_student_composes_with_attention_and_cache(wan, student, call_counter):
    out, _ = student
    teacher = _call(wan, 3)
    alone = accel.patch(wan, solver={"name": "flowmap", "artifact": out, "steps": 2})
    sample = _call(wan, 3)
    alone.remove()
    handle = accel.patch(wan, solver={"name": "flowmap", "artifact": out, "steps": 2},
                         attention={"name": "radial", "density": 1.0}, cache={"name": "fixed", "interval": 1})
    counter = call_counter(wan.transformer)
    try:
        composed = _call(wan, 3)
    finally:
        counter.remove()
        summary = handle.summary()
        handle.remove()
    assert counter.calls == 2
    assert summary["methods"]["attention"]["counters"]["calls"] > 0
    assert torch.allclose(composed, sample, atol=1e-5), "methods with nothing to skip leave the student's output"
    assert torch.equal(_call(wan, 3), teacher)


def test_sparse_attention_is_active_while_training(tmp_path):
    """--attention PATTERN trains through the pattern's differentiable path: sparse calls (its
    dense first layer aside), no fallback to dense, recorded in the artifact."""
    out = tmp_path / "sparse"
    assert main([*TINY, "--steps", "2", "--out", str(out), "--iterations", "2", "--attention", "radial"]) == 0
    used = json.load(open(out / "flowmap.json"))["training"]["attention"]
    assert used["name"] == "radial" and used["calls"] > 0
    assert used["sparse_calls"] > 0 and used["fallback_calls"] == 0
    assert used["sparse_calls"] + used["dense_calls"] == used["calls"]
    assert main([*TINY, "--steps", "2", "--out", str(tmp_path / "other"), "--attention", "nope"]) == 2


def test_a_resume_with_other_training_options_is_a_new_phase(tmp_path, capsys):
    out = str(tmp_path / "phases")
    assert main([*TINY, "--steps", "2", "--out", out, "--iterations", "2"]) == 0
    assert main([*TINY, "--steps", "2", "--out", out, "--iterations", "4", "--lr", "5e-5",
                 "--rollout-fraction", "0.5"]) == 0
    phases = json.load(open(os.path.join(out, "flowmap.json")))["training"]["phases"]
    assert [p["from_iteration"] for p in phases] == [0, 2]
    assert phases[1]["options"]["lr"] == 5e-5 and phases[1]["options"]["rollout_fraction"] == 0.5
    assert main([*TINY, "--steps", "1", "2", "--out", out, "--iterations", "6"]) == 2
    assert "written with other options" in capsys.readouterr().err


def test_lora_without_peft_is_a_clear_error(tmp_path, monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else find_spec(name, *a))
    assert main([*TINY, "--steps", "2", "--out", str(tmp_path), "--lora", "2"]) == 2
    assert "--lora trains LoRA factors through peft, which is not installed" in capsys.readouterr().err
