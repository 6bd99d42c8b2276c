"""Solver configs validate on construction and name the field and the allowed range."""
import pytest

import accel
from accel.base.registry import SOLVER_METHODS
from accel.pipelines.tiny import build_tiny_pipeline
from accel.solvers.swap import DPMppConfig, EulerConfig, HeunConfig, UniPCConfig


def test_registered_solvers():
    assert {"euler", "heun", "unipc", "dpmpp", "dss"} <= set(SOLVER_METHODS.names())


@pytest.mark.parametrize("kwargs, message", [
    (dict(steps=0), r"EulerConfig.steps must be in \[1, 1000\], got 0"),
    (dict(steps=2.5), r"EulerConfig.steps must be an integer"),
    (dict(shift=0.0), r"EulerConfig.shift must be in \(0, inf\)"),
    (dict(shift=-1), r"EulerConfig.shift must be in \(0, inf\)"),
    (dict(sigmas=(0.5, 0.8)), r"EulerConfig.sigmas must be strictly decreasing"),
    (dict(sigmas=(1.5, 0.5)), r"EulerConfig.sigmas\[0\] must be in \(0, 1\]"),
    (dict(sigmas=(0.9, 0.0)), r"EulerConfig.sigmas\[1\] must be in \(0, 1\]"),
    (dict(sigmas=()), r"EulerConfig.sigmas must not be empty"),
    (dict(sigmas=(0.9, 0.4), steps=3), r"EulerConfig.sigmas has 2 entries but EulerConfig.steps is 3"),
    (dict(sigmas=(0.9, 0.4), shift=2.0), r"EulerConfig.shift and EulerConfig.sigmas are exclusive"),
    (dict(cfg_interval=(0.6, 0.2)), r"EulerConfig.cfg_interval must have start <= end"),
    (dict(cfg_interval=(0.0, 1.5)), r"EulerConfig.cfg_interval\[1\] must be in \[0.0, 1.0\]"),
    (dict(cfg_interval=0.5), r"EulerConfig.cfg_interval must be a pair"),
    (dict(cfg_zero_steps=-1), r"EulerConfig.cfg_zero_steps must be in \[0, 1000\]"),
])
def test_bad_values_raise_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EulerConfig(**kwargs)


def test_every_solver_config_validates_and_unipc_order():
    for cls in (HeunConfig, UniPCConfig, DPMppConfig):
        with pytest.raises(ValueError, match=rf"{cls.__name__}.steps"):
            cls(steps=0)
    with pytest.raises(ValueError, match=r"UniPCConfig.order must be in \[1, 3\]"):
        UniPCConfig(order=4)
    assert EulerConfig(sigmas=[1.0, 0.5]).sigmas == (1.0, 0.5)  # lists become tuples (configs are frozen)


def test_bad_values_through_patch_leave_nothing_behind():
    pipe = build_tiny_pipeline("wan")
    scheduler = pipe.scheduler
    with pytest.raises(ValueError, match="steps"):
        accel.patch(pipe, solver={"name": "unipc", "steps": 0})
    assert pipe.scheduler is scheduler and "_accel_handle" not in vars(pipe)


def test_config_objects_pick_their_own_method():
    pipe = build_tiny_pipeline("flux")
    for config, name in ((EulerConfig(), "euler"), (HeunConfig(), "heun"), (UniPCConfig(), "unipc"),
                         (DPMppConfig(), "dpmpp")):
        with accel.patched(pipe, solver=config) as handle:
            assert handle.methods["solver"].name == name
