"""Fit the ``fitted`` forecast (``caching/forecast.py``) for one fixed schedule.

A skipped step s is forecast as a weighted sum of the last K computed residuals and of the moves
of the span input since the last M computed steps, one weight vector per CFG branch and step.
The weights are fitted where they will be used: step by step in order, on the states the cache
itself reaches.

    for each skipped step s, in order:
        run every calibration run with the schedule plus s computed, the steps before s
        forecast with the weights fitted so far, and stop after s;
        at s, the features (from the history the cache holds at s) and the residual the
        blocks computed are one least-squares sample per branch;
        the weights of s solve the normal equations, pooled over runs, tokens and streams.

Fitting on the dense trajectory instead would fit states the cache never sees once its own
forecasts have moved it. The least-squares objective is the error of one step, not of the video:
the weights at one step do not know what their error does later (a forecast that follows the
input's moves also feeds back what the forecasts before it got wrong). On the reference model the
fit alone gained 0.75 dB over TaylorSeer at 9 computed steps of 25 and lost 1.7 dB at 13 (decoded
output, captions and seeds outside the fit), so ``fit_blended`` mixes it with TaylorSeer's weights
(``blend``) at the share that scores best on the decoded output of the calibration runs,
TaylorSeer alone (share 0) included. Each run stops after its target step (through the
pipeline's ``callback_on_step_end`` interrupt where it has one), so a fit costs about half a
generation per skipped step and run.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from accel.caching.forecast import fitted_features, taylorseer_extrapolate

Run = Tuple[str, int]  # (prompt, seed)
# shares of the fitted forecast's weights tried against TaylorSeer's (0: TaylorSeer alone)
BLEND_SHARES = (0.0, 0.25, 0.5, 0.75, 1.0)


class _StepSamples:
    """Observer of one run: keeps each branch's computed steps and, at the target step, adds the
    features and the computed residual to the per-branch normal equations."""

    def __init__(self, target: int, residuals: int, inputs: int, sums: Dict[str, List[Any]]):
        self.target, self.residuals, self.inputs, self.sums = target, residuals, inputs, sums
        self.history: Dict[str, List[Tuple[int, Dict[str, torch.Tensor]]]] = {}
        self.inputs_at: Dict[str, Dict[int, Dict[str, torch.Tensor]]] = {}
        self.done: set = set()

    def __call__(self, record) -> None:
        step, branch = record.probe.step, record.probe.branch
        if step > self.target or branch in self.done:
            return
        streams = {name: value.detach() for name, value in record.span_input.items()
                   if torch.is_tensor(value) and torch.is_tensor(record.span_output.get(name))}
        residual = {name: record.span_output[name].detach() - value for name, value in streams.items()}
        history = self.history.setdefault(branch, [])
        inputs_at = self.inputs_at.setdefault(branch, {})
        if step == self.target:
            self.done.add(branch)
            if history:
                self._add(branch, history, inputs_at, streams, residual)
            return
        history.append((step, residual))
        inputs_at[step] = streams
        del history[:-max(self.residuals, self.inputs)]

    def _add(self, branch, history, inputs_at, span_input, residual) -> None:
        steps = [s for s, _ in history][::-1]  # newest first
        for name, target in residual.items():
            features = fitted_features(history, inputs_at, span_input, name, self.residuals, self.inputs)
            matrix = torch.stack([f.flatten() for f in features]).double()
            flat = target.flatten().double()
            entry = self.sums.setdefault(branch, [0.0, 0.0, 0.0, steps[:3], len(features)])
            entry[0] = entry[0] + matrix @ matrix.T
            entry[1] = entry[1] + matrix @ flat
            entry[2] = entry[2] + float(flat @ flat)


def _solve(gram: torch.Tensor, moment: torch.Tensor) -> torch.Tensor:
    # a relative jitter keeps the solve defined when two features coincide (one run, one token)
    jitter = 1e-9 * float(torch.trace(gram)) / gram.shape[0] + 1e-30
    return torch.linalg.solve(gram + jitter * torch.eye(gram.shape[0], dtype=gram.dtype), moment)


def _relative_error(gram, moment, energy, weights) -> float:
    error = energy - 2 * float(weights @ moment) + float(weights @ gram @ weights)
    return math.sqrt(max(error, 0.0) / energy) if energy > 0 else 0.0


def _taylorseer_weights(history_steps: Sequence[int], target: int, count: int) -> torch.Tensor:
    """TaylorSeer order 2 as a weight vector on the fitted forecast's features (residuals only)."""
    units = [torch.eye(count, dtype=torch.float64)[i] for i in range(len(history_steps))]
    return taylorseer_extrapolate(list(history_steps), units, target)


def fit_forecast(pipe: Any, runs: Sequence[Run], num_steps: int, compute_steps: Sequence[int], *,
                 residuals: int = 3, inputs: int = 2, call_kwargs: Optional[Dict[str, Any]] = None,
                 base: Optional[Dict[str, Any]] = None,
                 log: Callable[[str], None] = lambda message: None) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(weights, report): the ``weights`` field of a fitted ``fixed`` artifact for ``compute_steps``
    of ``num_steps``, and per step and branch the fit's relative error next to TaylorSeer order
    2's on the same samples, with TaylorSeer's weights on those features. ``base`` holds the
    artifact fields that describe the model (its ``artifact_meta``)."""
    import accel
    from accel.caching.configs import FixedCacheConfig

    if residuals < 1 or inputs < 0:
        raise ValueError(f"the fitted forecast needs residuals >= 1 and inputs >= 0, got {residuals} and {inputs}")
    if not runs:
        raise ValueError("fitting a forecast needs at least one prompt")
    schedule = sorted(set(int(s) for s in compute_steps))
    kwargs = {k: v for k, v in (call_kwargs or {}).items()
              if k not in ("generator", "prompt", "num_inference_steps", "output_type", "return_dict",
                           "callback_on_step_end")}
    interrupts = "callback_on_step_end" in inspect.signature(pipe.__call__).parameters
    branches: Dict[str, Dict[str, List[float]]] = {}
    report: Dict[str, Dict[str, Dict[str, float]]] = {}
    for target in (s for s in range(num_steps) if s not in schedule):
        artifact = {**(base or {}), "kind": "fixed", "num_steps": num_steps, "forecast": "fitted", "order": 2,
                    "compute_steps": sorted(schedule + [target]),
                    "weights": {"residuals": residuals, "inputs": inputs, "branches": branches}}
        sums: Dict[str, List[Any]] = {}
        for prompt, seed in runs:
            samples = _StepSamples(target, residuals, inputs, sums)
            handle = accel.patch(pipe, cache=FixedCacheConfig(forecast="fitted", calibration=artifact))
            handle.methods["cache"].engine.observers.append(samples)
            extra = {"callback_on_step_end": _stop_after(target)} if interrupts else {}
            try:
                with torch.no_grad():
                    pipe(prompt=prompt, num_inference_steps=num_steps, output_type="latent",
                         generator=torch.Generator("cpu").manual_seed(seed), **kwargs, **extra)
            finally:
                handle.remove()
        for branch, (gram, moment, energy, history_steps, count) in sums.items():
            weights = _solve(gram, moment)
            branches.setdefault(branch, {})[str(target)] = [float(w) for w in weights]
            fitted = _relative_error(gram, moment, energy, weights)
            taylorseer = _taylorseer_weights(history_steps, target, count)
            peer = _relative_error(gram, moment, energy, taylorseer)
            report.setdefault(branch, {})[str(target)] = {"fitted": round(fitted, 5), "taylorseer": round(peer, 5),
                                                          "taylorseer_weights": [float(w) for w in taylorseer]}
            log(f"step {target} {branch}: relative error {fitted:.4f} (TaylorSeer order 2 on the same states "
                f"{peer:.4f}), weights {[round(float(w), 3) for w in weights]}")
    if not branches:
        raise ValueError(f"no skipped step of the schedule {schedule} follows a computed one: nothing to fit")
    return {"residuals": residuals, "inputs": inputs, "branches": branches}, report


def blend(weights: Dict[str, Any], report: Dict[str, Any], share: float) -> Dict[str, Any]:
    """``share`` of the fitted weights plus the rest of TaylorSeer order 2's on the same features:
    1 is the fit, 0 TaylorSeer itself. The fit minimises each step's error on its own; how much of it
    the whole run can take is chosen on the decoded output (``search_schedule``)."""
    branches = {branch: {step: [share * w + (1.0 - share) * t
                                for w, t in zip(found, report[branch][step]["taylorseer_weights"])]
                         for step, found in steps.items()}
                for branch, steps in weights["branches"].items()}
    return {**weights, "branches": branches}


def fit_blended(pipe: Any, runs: Sequence[Run], artifact: Dict[str, Any], score: Callable[[Any], float], *,
                residuals: int = 3, inputs: int = 2, call_kwargs: Optional[Dict[str, Any]] = None,
                min_gain: float = 0.5, log: Callable[[str], None] = lambda message: None) -> None:
    """Fill a fitted ``fixed`` artifact's ``weights`` and ``fit``: fit on its schedule, then keep the
    share of ``BLEND_SHARES`` whose cache config ``score`` rates best, when it gains more than
    ``min_gain`` over TaylorSeer alone (else share 0)."""
    from accel.caching.configs import FixedCacheConfig

    meta = {k: v for k, v in artifact.items() if k not in ("compute_steps", "weights", "fit", "search")}
    weights, report = fit_forecast(pipe, runs, artifact["num_steps"], artifact["compute_steps"], residuals=residuals,
                                   inputs=inputs, call_kwargs=call_kwargs, base=meta, log=log)
    scores = {}
    for share in BLEND_SHARES:
        candidate = {**artifact, "weights": blend(weights, report, share)}
        scores[share] = score(FixedCacheConfig(forecast="fitted", order=artifact["order"], calibration=candidate))
        log(f"fitted share {share}: {scores[share]:.2f} dB")
    best = max(scores, key=scores.get)
    if scores[best] <= scores[0.0] + min_gain:
        best = 0.0
        log(f"no share of the fit gained {min_gain} dB over TaylorSeer alone: "
            "the artifact holds TaylorSeer's weights (share 0)")
    artifact["weights"] = blend(weights, report, best)
    errors = {branch: {step: {k: v for k, v in e.items() if k != "taylorseer_weights"} for step, e in steps.items()}
              for branch, steps in report.items()}
    artifact["fit"] = {"share": best, "share_scores_db": {str(k): round(v, 3) for k, v in scores.items()},
                       "relative_errors": errors}


def _stop_after(target: int):
    """A ``callback_on_step_end`` that interrupts the loop once step ``target`` has run."""
    def stop(pipe, index, timestep, callback_kwargs):
        if index >= target:
            pipe._interrupt = True  # diffusers' pipelines skip the remaining steps
        return {}
    return stop
