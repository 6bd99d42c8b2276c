"""Search where a ``fixed`` cache computes: K computed steps out of N, placed where the output stays
closest to dense.

Placing the same number of computed steps differently moves the result by several dB: on the
reference model at 25 steps and 9 computed steps (taylorseer order 2), computing steps
0, 3, 6, ..., 24 gave 38.4 dB, 0, 2, 5, ..., 23 gave 41.0 dB and the searched 0, 2, 4, 7, 10, 14,
17, 20, 23 gave 41.7 dB on held-out prompts (docs/cache_forecasting.md). Which placement wins
depends on the forecast and on how errors feed back through later steps, so it is measured, not
derived:

1. start from the best evenly spaced mask with K steps that computes step 0 (gaps of
   floor and ceil((N - 1) / (K - 1)), every offset of the last computed step from the end);
2. shift one computed step, then a run of two or three consecutive ones (never step 0: the
   forecast needs a first residual), by one step either way and keep the first move that gains
   more than ``min_gain`` dB (0.5 by default: smaller gains on a few prompts did not carry
   over to held-out ones); stop at a local optimum or after ``max_evaluations`` runs. Runs
   matter: with TaylorSeer's order 2, any single move off an even spacing lost on the reference
   model, where shifting three steps together (one gap longer, one shorter) gained.

The score of a mask is the PSNR in dB of the decoded output (values in [0, 1]) against the dense
output of the same prompt and seed, averaged over the calibration prompts (training captions for
the reference model, never the evaluated ones) and over ``seeds`` noise draws per prompt: the
fidelity ``accel bench cache`` reports. The
latents' SNR was tried first and picked masks that lost 1.9-2.0 dB on held-out prompts where the
decoded PSNR's pick gained. Each evaluation is one full generation per prompt.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

Mask = Tuple[int, ...]
# A move is kept only when it gains this much on the calibration prompts: on the reference model a
# 7-step move that gained 0.1 dB there lost 3.7 dB on held-out prompts, where the kept moves of
# 0.6-1.2 dB (9 and 13 steps) carried over.
MIN_GAIN_DB = 0.5
SEED_STRIDE = 1000


def evenly_spaced_masks(num_steps: int, budget: int) -> List[Mask]:
    """Every evenly spaced set of ``budget`` steps in ``range(num_steps)`` that holds step 0."""
    if not 1 <= budget <= num_steps:
        raise ValueError(f"budget must be between 1 and the step count {num_steps}, got {budget}")
    if budget == 1:
        return [(0,)]
    span = num_steps - 1
    masks = set()
    for gap in {span // (budget - 1), -(-span // (budget - 1))}:
        for offset in range(max(gap, 1)):
            last = num_steps - 1 - offset
            steps = {0} | {last - j * gap for j in range(budget - 1) if last - j * gap > 0}
            if len(steps) == budget:
                masks.add(tuple(sorted(steps)))
    return sorted(masks)


def neighbours(mask: Mask, num_steps: int, max_run: int = 3) -> List[Mask]:
    """Masks with a run of 1 to ``max_run`` consecutive computed steps (not step 0) shifted by one
    step, shorter runs first, each in order of position."""
    out: List[Mask] = []
    for run in range(1, max_run + 1):
        for start in range(1 if mask[0] == 0 else 0, len(mask) - run + 1):
            for shift in (-1, 1):
                moved = mask[:start] + tuple(s + shift for s in mask[start:start + run]) + mask[start + run:]
                if moved[0] >= 0 and moved[-1] < num_steps and all(a < b for a, b in zip(moved, moved[1:])) \
                        and (mask[0] != 0 or moved[0] == 0) and moved not in out:
                    out.append(moved)
    return out


def calibration_runs(prompts: Sequence[str], seed: int, seeds: int) -> List[Tuple[str, int]]:
    """(prompt, seed) pairs: prompt i at draw j uses seed + SEED_STRIDE * j + i, so draws of one
    prompt never share noise."""
    if seeds < 1:
        raise ValueError(f"seeds must be at least 1, got {seeds}")
    return [(prompt, seed + SEED_STRIDE * j + i) for j in range(seeds) for i, prompt in enumerate(prompts)]


def psnr_db(output: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR of outputs in [0, 1], capped at 100 dB (equal outputs)."""
    error = (output.float() - reference.float()).pow(2).mean().item()
    return 100.0 if error == 0 else min(100.0, -10.0 * math.log10(error))


class ScheduleSearch:
    """Scores compute masks for one pipeline, prompt set and forecast (memoised by mask)."""

    def __init__(self, pipe: Any, prompts: Sequence[str], num_steps: int, *, forecast: str = "taylorseer",
                 order: int = 2, call_kwargs: Optional[Dict[str, Any]] = None, seed: int = 0, seeds: int = 1,
                 log: Callable[[str], None] = lambda message: None):
        from accel.caching.configs import FixedCacheConfig

        if not prompts:
            raise ValueError("the schedule search needs at least one prompt")
        if forecast == "fitted":
            raise ValueError("a schedule is searched for a formula forecast; the fitted one is fitted on the result")
        FixedCacheConfig(forecast=forecast, order=order)  # validates both before any run
        self.pipe, self.prompts, self.num_steps = pipe, list(prompts), num_steps
        self.forecast, self.order, self.log = forecast, order, log
        self.runs = calibration_runs(prompts, seed, seeds)
        self.call_kwargs = {k: v for k, v in (call_kwargs or {}).items()
                            if k not in ("generator", "prompt", "num_inference_steps", "output_type", "return_dict")}
        self.scores: Dict[Mask, float] = {}
        self.dense = self._generate(None)

    def _generate(self, config: Any) -> List[torch.Tensor]:
        """Decoded outputs of every run with ``config`` as the cache (None: dense)."""
        import accel

        handle = None if config is None else accel.patch(self.pipe, cache=config)
        try:
            outputs = []
            for prompt, seed in self.runs:
                generator = torch.Generator("cpu").manual_seed(seed)
                with torch.no_grad():
                    out = self.pipe(prompt=prompt, num_inference_steps=self.num_steps, generator=generator,
                                    output_type="pt", return_dict=False, **self.call_kwargs)[0]
                outputs.append(out.detach().cpu())
            return outputs
        finally:
            if handle is not None:
                handle.remove()

    def score(self, mask: Mask) -> float:
        mask = tuple(sorted(mask))
        if mask not in self.scores:
            from accel.caching.configs import FixedCacheConfig

            self.scores[mask] = self.score_config(FixedCacheConfig(
                interval=1, compute_steps=mask, forecast=self.forecast, order=self.order))
            self.log(f"{list(mask)}: {self.scores[mask]:.2f} dB")
        return self.scores[mask]

    def score_config(self, config: Any) -> float:
        """The score of any cache config on the same runs (not memoised)."""
        outputs = self._generate(config=config)
        return sum(psnr_db(o, d) for o, d in zip(outputs, self.dense)) / len(outputs)

    def run(self, budget: int, *, max_evaluations: int = 80, min_gain: float = MIN_GAIN_DB) -> Dict[str, Any]:
        starts = evenly_spaced_masks(self.num_steps, budget)
        start = max(starts, key=self.score)
        best, best_score = start, self.score(start)
        improved = True
        while improved and len(self.scores) < max_evaluations:
            improved = False
            for candidate in neighbours(best, self.num_steps):
                if len(self.scores) >= max_evaluations:
                    break
                if self.score(candidate) > best_score + min_gain:
                    best, best_score, improved = candidate, self.scores[candidate], True
                    break
        return {"compute_steps": list(best), "score_db": round(best_score, 3),
                "start": list(start), "start_score_db": round(self.scores[start], 3),
                "evaluations": len(self.scores), "local_optimum": not improved}


def search_schedule(pipe: Any, prompts: Sequence[str], steps: int, budget: Optional[int], *,
                    forecast: str = "taylorseer", order: int = 2, call_kwargs: Optional[Dict[str, Any]] = None,
                    seed: int = 0, seeds: int = 1, max_evaluations: int = 80, schedule: Optional[Any] = None,
                    residuals: int = 3, inputs: int = 2, out: Optional[str] = None,
                    log: Callable[[str], None] = lambda message: None) -> Dict[str, Any]:
    """A ``fixed`` calibration artifact: the searched ``compute_steps`` for ``budget`` of ``steps``.

    With ``forecast="fitted"`` the schedule is searched for TaylorSeer of ``order`` (or taken from
    ``schedule``, a ``fixed`` artifact); the fitted forecast's weights are then fitted on it and
    blended with TaylorSeer's on the same runs (``distill/forecast_fit.py``).
    """
    import accel
    from accel.caching.calibration import load_calibration, save_calibration
    from accel.caching.configs import FixedCacheConfig

    from .cache_calibration import artifact_meta
    from .forecast_fit import fit_blended

    if steps < 2:
        raise ValueError(f"the schedule search needs at least 2 steps, got {steps}")
    if schedule is not None and forecast != "fitted":
        raise ValueError("a given schedule is only refitted: it goes with forecast 'fitted'")
    handle = accel.patch(pipe, cache=FixedCacheConfig())  # only to describe the model as the cache sees it
    try:
        meta = artifact_meta(handle.session, steps, call_kwargs, len(prompts), 0, 0)
    finally:
        handle.remove()
    searched_for = "taylorseer" if forecast == "fitted" else forecast
    search = None
    if schedule is not None:
        given = load_calibration(schedule, "fixed", model_class=meta["model_class"], num_steps=steps)
        given.check_model(meta["model_class"], meta["model_fingerprint"])
        compute_steps, found = list(given.compute_steps), {"schedule": given.source}
    else:
        if budget is None:
            raise ValueError("--cache fixed needs --budget K: how many of the --steps steps compute")
        search = ScheduleSearch(pipe, prompts, steps, forecast=searched_for, order=order, call_kwargs=call_kwargs,
                                seed=seed, seeds=seeds, log=log)
        found = search.run(budget, max_evaluations=max_evaluations)
        compute_steps = found.pop("compute_steps")
    artifact = {**meta, "kind": "fixed", "compute_steps": compute_steps, "forecast": forecast,
                "order": order, "seeds": seeds, "search": found}
    if forecast == "fitted":
        search = search or ScheduleSearch(pipe, prompts, steps, forecast=searched_for, order=order,
                                          call_kwargs=call_kwargs, seed=seed, seeds=seeds, log=log)
        fit_blended(pipe, search.runs, artifact, search.score_config, residuals=residuals, inputs=inputs,
                    call_kwargs=call_kwargs, min_gain=MIN_GAIN_DB, log=log)
    if out is not None:
        save_calibration(artifact, out)
    return artifact
