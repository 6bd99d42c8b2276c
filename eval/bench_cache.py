"""``accel bench cache``: our cache rules against the caches users have today, same prompts, same run.

    accel bench cache --json OUT [--png PLOT] [--prompts 4] [--weights DIR | --model tiny]

Rows (one per method and setting): ``method``, ``source`` (``accel``, ``diffusers``,
``cache-dit``), ``params``, ``compute_fraction`` (the block work run over the dense run's,
counted by the same hooks for ours and the peers: ``eval/work_count.py``; ours also carry the
engine's own count as ``engine_compute_fraction``), ``wall_speedup`` (dense time / method time, same process), ``psnr``,
``ssim`` (against the dense video of the same prompt and seed) and ``prompt_accuracy``.

Peers run only when importable (``pip install -e ".[bench]"``): diffusers' ``FirstBlockCache``,
``TaylorSeerCache``, ``MagCache`` (calibrated by its own ``calibrate=True`` run), pyramid
attention broadcast and ``FasterCache``; cache-dit's ``DBCache`` with and without its
TaylorSeer calibrator. A peer that refuses the model is kept as a row with ``skipped`` and the
reason, never dropped silently.

Calibrations for ``teacache``/``magcache`` (ours and diffusers') are fitted in the same process
on training-set captions, never on the evaluated held-out prompts. The dense run is re-timed
every ``--retime-every`` rows and speed-ups use the latest dense timings (a shared CPU drifts);
each re-run must reproduce the first dense videos exactly, and the last one, after every row, is
reported as ``baseline_drift_psnr``: 100 means every peer's ``disable`` restored the pipeline.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import re
import sys
from typing import Any, Callable, Dict, List, Optional

from accel.base.cli_args import integer, output_path
from accel import caching  # noqa: F401  (fills CACHE_METHODS, the names --only accepts)
from accel.base.registry import CACHE_METHODS
from accel.pipelines.reference import data

from .quality_bench import QualityBench, add_workload_args, environment, load_workload, patch_setup, write_result

# the budgets (computed steps of 25) with a fitted forecast shipped for the reference model
FITTED_BUDGETS = (9,)

# (method, params): thresholds from "nearly exact" (fbcache 0.05 reuses nothing on the reference
# model: a check that the engine costs nothing) to as fast as each rule goes on it.
ACCEL_SWEEP = (
    [("fbcache", {"threshold": t}) for t in (0.05, 0.1, 0.2, 0.3)]
    + [("fbcache", {"threshold": 0.3, "forecast": "taylor", "order": 1})]
    + [("teacache", {"threshold": t}) for t in (0.1, 0.2, 0.4)]
    + [("magcache", {"threshold": t}) for t in (0.12, 0.24)]
    + [("magcache", {"threshold": 0.24, "max_consecutive_reuses": 4, "warmup_ratio": 0.1})]
    + [("easycache", {"threshold": t}) for t in (0.1, 0.2)]
    + [("fixed", {"interval": 2, "forecast": "none", "schedule": "uniform"})]
    + [("fixed", {"interval": n, "forecast": "taylor", "order": o, "schedule": "uniform"})
       for n in (2, 3, 4, 5) for o in (1, 2)]
    + [("fixed", {"interval": n, "forecast": "taylorseer", "order": 2, "schedule": "uniform"}) for n in (2, 3, 4, 5)]
    + [("fixed", {"interval": n, "forecast": "foca", "schedule": "uniform"}) for n in (2, 3, 4, 5)]
    # interval 5 with a second warm-up step: the same 6 of 25 computed steps as diffusers' interval 5
    + [("fixed", {"interval": 5, "warmup_steps": 2, "forecast": f, "order": o, "schedule": "uniform"})
       for f, o in (("taylor", 1), ("taylorseer", 2))]
    # as many computed steps as the uniform rows above, placed by `accel calibrate --cache fixed`
    # (searched on training captions; shipped for the reference model, uniform with a warning elsewhere)
    + [("fixed", {"interval": n, "forecast": "taylorseer", "order": 2, "schedule": "searched"}) for n in (2, 3, 4)]
    # 6 of 25 steps (no interval gives that count with one warm-up step): the shipped artifact by name
    + [("fixed", {"calibration": "fixed-25-6.json", "forecast": "taylorseer", "order": 2})]
    # the fitted forecast on its schedule (`accel calibrate --cache fixed --forecast fitted`), where shipped
    + [("fixed", {"calibration": f"fixed-25-{k}-fitted.json", "forecast": "fitted"}) for k in FITTED_BUDGETS]
    # adaptive rules with a forecast of the reused steps
    + [("magcache", {"threshold": 0.24, "max_consecutive_reuses": 4, "warmup_ratio": 0.1, "forecast": f, "order": o})
       for f, o in (("taylor", 1), ("taylorseer", 2))]
    + [("teacache", {"threshold": 0.2, "forecast": "taylor", "order": 1})]
)


def accel_rows(bench: QualityBench, calibrations: Dict[str, Any], only=None) -> List[Dict[str, Any]]:
    from accel.caching.configs import EasyCacheConfig, FBCacheConfig, FixedCacheConfig, MagCacheConfig, TeaCacheConfig

    classes = {"fbcache": FBCacheConfig, "teacache": TeaCacheConfig, "magcache": MagCacheConfig,
               "easycache": EasyCacheConfig, "fixed": FixedCacheConfig}
    rows = []
    for method, params in ACCEL_SWEEP:
        if only and method not in only:
            continue
        extra = {"calibration": calibrations[method]} if method in calibrations else {}
        if method == "fixed" and "calibration" in params:  # a shipped schedule, named by its file
            extra = {"calibration": shipped_calibration(bench, params["calibration"])}
            if extra["calibration"] is None:
                continue
            params_for_config = {k: v for k, v in params.items() if k != "calibration"}
        else:
            params_for_config = params
        setup = patch_setup(cache=classes[method](**params_for_config, **extra))
        row = bench.measure({"method": method, "source": "accel", "params": params}, setup)
        # the engine's own count (blocks run / dense), next to the hook count every row has
        counters = setup.summary["methods"]["cache"]["counters"]
        row["engine_compute_fraction"] = counters["compute_fraction"]
        if "schedule" in counters:  # which steps a fixed cache computed (uniform, or the searched artifact)
            row["schedule"] = counters["schedule"]  # and how it forecast the others
            row["forecast"] = counters["forecast"]
        rows.append(row)
    return rows


def shipped_calibration(bench: QualityBench, name: str) -> Optional[str]:
    """The path of calibration ``name`` when it is shipped for the bench's model (same class and
    architecture config), else None."""
    import os

    from accel.api import adapter_for
    from accel.base.adapter import config_fingerprint
    from accel.caching.calibration import load_calibration

    model = bench.workload.pipe.transformer
    for folder in adapter_for(model).artifact_dirs:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            calibration = load_calibration(path, name.split("-")[0])
            if calibration.model_class == type(model).__name__ \
                    and calibration.meta.get("model_fingerprint") == config_fingerprint([model]):
                return path
    return None


def fit_calibrations(bench: QualityBench, prompts: int = 4) -> Dict[str, Any]:
    """Our TeaCache polynomial and MagCache ratios for this model, step count and size."""
    from accel.distill.cache_calibration import calibrate_magcache, calibrate_teacache

    captions = data.training_captions(prompts)
    kwargs = {k: v for k, v in bench.workload.call_kwargs.items() if k != "num_inference_steps"}
    steps = bench.workload.call_kwargs.get("num_inference_steps", 25)
    return {"teacache": calibrate_teacache(bench.workload.pipe, captions, steps, call_kwargs=kwargs),
            "magcache": calibrate_magcache(bench.workload.pipe, captions, steps, call_kwargs=kwargs)}


# ------------------------------------------------------------------------------------ peers

def _diffusers_setup(config_factory: Callable[[Any], Any]):
    def setup(pipe):
        pipe.transformer.enable_cache(config_factory(pipe))
        return pipe.transformer.disable_cache
    return setup


def diffusers_magcache_ratios(bench: QualityBench) -> List[float]:
    """diffusers' MagCache calibration: one ``calibrate=True`` run, whose ratios it prints."""
    from diffusers import MagCacheConfig

    steps = bench.workload.call_kwargs.get("num_inference_steps", 25)
    caption = data.training_captions(1)[0]
    pipe = bench.workload.pipe
    printed = io.StringIO()
    pipe.transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
    try:
        with contextlib.redirect_stdout(printed):
            pipe(prompt=caption, negative_prompt="", output_type="latent", **bench.workload.call_kwargs)
    finally:
        pipe.transformer.disable_cache()
    found = re.findall(r"\[([-0-9.eE, ]+)\]", printed.getvalue())
    if not found:
        raise RuntimeError("diffusers MagCache calibration printed no ratios")
    ratios = [float(x) for x in found[0].split(",")]
    if len(ratios) != steps:
        raise RuntimeError(f"diffusers MagCache calibration gave {len(ratios)} ratios for {steps} steps")
    return ratios


# The peers' rows, as --only names them (the sweeps below make one row per setting of each).
PEERS = ("FirstBlockCache", "TaylorSeerCache", "MagCache", "PyramidAttentionBroadcast", "FasterCache",
         "DBCache", "DBCache+TaylorSeer")


def diffusers_sweep(bench: QualityBench, only=None) -> List[tuple]:
    """(method, params, setup factory) of each diffusers cache setting; empty without diffusers hooks."""
    try:
        from diffusers import (FasterCacheConfig, FirstBlockCacheConfig, MagCacheConfig,
                               PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig)
    except ImportError:
        return []
    steps = bench.workload.call_kwargs.get("num_inference_steps", 25)
    sweep = [("FirstBlockCache", {"threshold": t}, lambda p, t=t: FirstBlockCacheConfig(threshold=t))
             for t in (0.1, 0.2, 0.3)]
    # TaylorSeer's default module patterns are full-matched and written for FLUX-style names
    # ("^blocks.*attn" misses Wan's "blocks.0.attn1"), so on Wan they hook nothing; name the
    # modules it forecasts (self-attention, cross-attention and feed-forward of every block).
    blocks = getattr(bench.workload.pipe.transformer, "blocks", None)
    identifiers = [r"^blocks\.\d+\.(attn1|attn2|ffn)$"] if blocks is not None else None
    sweep += [("TaylorSeerCache", {"cache_interval": n, "max_order": o},
               lambda p, n=n, o=o: TaylorSeerCacheConfig(cache_interval=n, max_order=o, disable_cache_before_step=1,
                                                        cache_identifiers=identifiers))
              for n in (2, 3, 4, 5) for o in (1, 2)]
    try:
        if only and "MagCache" not in only:
            raise LookupError("not requested")
        ratios = diffusers_magcache_ratios(bench)
        sweep += [("MagCache", {"threshold": t}, lambda p, t=t: MagCacheConfig(
            threshold=t, num_inference_steps=steps, mag_ratios=ratios)) for t in (0.06, 0.12, 0.24)]
    except LookupError:
        pass
    except Exception as exc:  # noqa: BLE001 - a peer failing is a result, reported as a skipped row
        sweep.append(("MagCache", {}, exc))
    sweep += [("PyramidAttentionBroadcast", {"spatial_attention_block_skip_range": n},
               lambda p, n=n: PyramidAttentionBroadcastConfig(
                   spatial_attention_block_skip_range=n, spatial_attention_timestep_skip_range=(100, 800),
                   current_timestep_callback=lambda: p.current_timestep)) for n in (2, 3)]
    sweep.append(("FasterCache", {"spatial_attention_block_skip_range": 2}, lambda p: FasterCacheConfig(
        spatial_attention_block_skip_range=2, current_timestep_callback=lambda: p.current_timestep,
        attention_weight_callback=lambda _: 0.3, is_guidance_distilled=False)))
    return sweep


def cache_dit_sweep(bench: QualityBench) -> List[tuple]:
    try:
        import cache_dit
    except ImportError:
        return []
    steps = bench.workload.call_kwargs.get("num_inference_steps", 25)

    def factory(threshold, taylor):
        def setup(pipe):
            # Fn=1/Bn=0 is the first-block cache of the same span ours uses; cache-dit's default
            # Fn=8 would leave nothing cached on an 8-block model.
            config = cache_dit.DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0,
                                             residual_diff_threshold=threshold, max_warmup_steps=1,
                                             num_inference_steps=steps)
            calibrator = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=taylor) if taylor else None
            with contextlib.redirect_stdout(io.StringIO()):
                cache_dit.enable_cache(pipe, cache_config=config, calibrator_config=calibrator)
            return lambda: cache_dit.disable_cache(pipe)
        return setup

    # taylor: 0 (none) or the calibrator's order, 1 or 2
    return [("DBCache" + ("+TaylorSeer" if taylor else ""),
             {"threshold": t, "Fn": 1, "Bn": 0, **({"order": taylor} if taylor else {})},
             factory(t, taylor)) for taylor in (0, 1, 2) for t in (0.08, 0.16, 0.32)]


def peer_rows(bench: QualityBench, source: str, sweep: List[tuple], wrap, only=None) -> List[Dict[str, Any]]:
    rows = []
    for method, params, factory in sweep:
        if only and method not in only:
            continue
        fields = {"method": method, "source": source, "params": params}
        if isinstance(factory, Exception):
            rows.append({**fields, "compute_fraction": None, "skipped": f"{type(factory).__name__}: {factory}"})
            continue
        try:
            rows.append(bench.measure(fields, wrap(factory)))
        except Exception as exc:  # noqa: BLE001 - the peer does not support this model/setting
            bench.log(f"{source} {method} {params}: skipped ({type(exc).__name__}: {exc})")
            rows.append({**fields, "compute_fraction": None, "skipped": f"{type(exc).__name__}: {str(exc)[:300]}"})
    return rows


# ------------------------------------------------------------------------------------ report

def pareto_front(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Rows no other row beats on both compute fraction (less) and PSNR (more), least compute first."""
    measured = sorted((r for r in rows if "psnr" in r), key=lambda r: (r["compute_fraction"], -r["psnr"]))
    front, best_psnr = [], float("-inf")
    for row in measured:
        if row["psnr"] > best_psnr:
            front.append(row)
            best_psnr = row["psnr"]
    return front


# Matched-compute targets: at compute <= 0.6 ours must match every peer row at no more compute,
# and beat it by 1 dB where the peer runs at most 0.4 of the work.
MATCHED_LIMIT, MARGIN_LIMIT, MARGIN_DB = 0.6, 0.4, 1.0


def targets(rows: List[Dict[str, Any]], baseline_accuracy: Optional[float]) -> Dict[str, Any]:
    """For every peer row at compute <= 0.6: our best row at no more compute and the margin
    (reported, not asserted); ``worst`` is the smallest margin over the required one."""
    ours = [r for r in rows if r["source"] == "accel" and "psnr" in r]
    comparisons = []
    for peer in sorted((r for r in rows if r["source"] != "accel" and "psnr" in r
                        and r["compute_fraction"] <= MATCHED_LIMIT), key=lambda r: r["compute_fraction"]):
        mine = [r for r in ours if r["compute_fraction"] <= peer["compute_fraction"] + 1e-9]
        best = max(mine, key=lambda r: r["psnr"]) if mine else None
        required = MARGIN_DB if peer["compute_fraction"] <= MARGIN_LIMIT else 0.0
        margin = None if best is None else round(best["psnr"] - peer["psnr"], 3)
        comparisons.append({"peer": _brief(peer), "ours": _brief(best), "margin_db": margin, "required_db": required,
                            "met": margin is not None and margin >= required})
    worst = min(comparisons, key=lambda c: float("-inf") if c["margin_db"] is None
                else c["margin_db"] - c["required_db"], default=None)
    out = {"matched_compute": comparisons, "all_met": all(c["met"] for c in comparisons), "worst": worst}
    mine = [r for r in ours if r["compute_fraction"] <= 0.5]
    best = max(mine, key=lambda r: r["psnr"]) if mine else None
    if baseline_accuracy is not None and best is not None and best["prompt_accuracy"] is not None:
        out["prompt_accuracy_at_half_compute"] = {"dense": baseline_accuracy, "ours": best["prompt_accuracy"],
                                                  "met": baseline_accuracy - best["prompt_accuracy"] <= 0.05}
    return out


def _brief(row: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    if row is None:
        return None
    return {k: row.get(k) for k in ("method", "source", "params", "compute_fraction", "wall_speedup", "psnr")}


def format_table(rows: List[Dict[str, Any]]) -> str:
    lines = ["| source | method | params | compute | speed-up | PSNR dB | SSIM | prompt acc |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["source"], r["method"], -(r.get("wall_speedup") or 0))):
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items())
        if "skipped" in r:
            lines.append(f"| {r['source']} | {r['method']} | {params} | | | | | skipped: {r['skipped'][:60]} |")
            continue
        compute = "" if r["compute_fraction"] is None else f"{r['compute_fraction']:.2f}"
        accuracy = "" if r["prompt_accuracy"] is None else f"{r['prompt_accuracy']:.2f}"
        lines.append(f"| {r['source']} | {r['method']} | {params} | {compute} | {r['wall_speedup']:.2f}x | "
                     f"{r['psnr']:.2f} | {r['ssim']:.4f} | {accuracy} |")
    return "\n".join(lines)


PLOT_PSNR_CAP = 60.0


def save_plot(rows: List[Dict[str, Any]], path: str, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--png needs matplotlib: pip install -e \".[bench]\"") from None
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    # Exact rows (PSNR capped at 100 dB) would squash every lossy point into the bottom third.
    def shown(row):
        return min(row["psnr"], PLOT_PSNR_CAP)
    styles = {"accel": ("tab:red", "o"), "diffusers": ("tab:blue", "s"), "cache-dit": ("tab:green", "^")}
    for source, (colour, marker) in styles.items():
        points = [r for r in rows if r["source"] == source and "psnr" in r]
        if not points:
            continue
        ax.scatter([r["compute_fraction"] for r in points], [shown(r) for r in points], c=colour, marker=marker,
                   label=source, alpha=0.8)
        front = pareto_front(points)
        ax.plot([r["compute_fraction"] for r in front], [shown(r) for r in front], c=colour, alpha=0.5)
    ax.set_xlabel("compute fraction (block work run / dense, counted by the same hooks for every row)")
    ax.set_ylabel(f"PSNR vs dense (dB; above {PLOT_PSNR_CAP:g} drawn at {PLOT_PSNR_CAP:g})")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="accel bench cache", description=__doc__.splitlines()[0])
    # 2 prompts keep the default run under 15 minutes on a 2-core CPU (4 took 27).
    add_workload_args(parser, prompts=2)
    parser.add_argument("--png", type=output_path, default=None, help="write the PSNR vs compute Pareto plot here")
    parser.add_argument("--no-peers", action="store_true", help="only our methods")
    parser.add_argument("--retime-every", type=integer(0), default=6,
                        help="re-time the dense run after this many rows (0: never); speed-ups use the latest")
    parser.add_argument("--calibration-prompts", type=integer(1), default=4)
    parser.add_argument("--only", nargs="+", default=None, metavar="METHOD", choices=(*CACHE_METHODS.names(), *PEERS),
                        help="only these methods (ours by name, e.g. fbcache; peers by class, e.g. FirstBlockCache)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        workload = load_workload(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"accel bench cache: error: {exc}", file=sys.stderr)
        return 2
    log = lambda message: print(f"[bench cache] {message}", flush=True)  # noqa: E731
    bench = QualityBench(workload, log=log, retime_every=args.retime_every, repeats=args.repeats, count_work=True)
    bench.warm_up()
    baseline = bench.set_baseline(repeats=2)
    log(f"dense: {baseline}")
    only = set(args.only) if args.only else None
    calibrations = ({} if only and not only & {"teacache", "magcache"}
                    else fit_calibrations(bench, args.calibration_prompts))
    rows = accel_rows(bench, calibrations, only)
    if not args.no_peers:
        rows += peer_rows(bench, "diffusers", diffusers_sweep(bench, only), _diffusers_setup, only)
        rows += peer_rows(bench, "cache-dit", cache_dit_sweep(bench), lambda setup: setup, only)
    _, drift_psnr = bench.retime_baseline()
    result = {
        "what": "cache methods vs dense on one workload: fidelity to the dense video of the same prompt and seed, "
                "and wall speed-up against dense timed in the same process",
        "environment": environment(), "workload": workload.description, "baseline": baseline,
        "baseline_drift_psnr": drift_psnr, "baseline_timings": [round(t, 3) for t in bench.baseline_timings],
        "calibration": {"prompts": args.calibration_prompts, "source": "training-set captions"},
        "rows": [{**r, "wall_speedup": r.pop("speedup", None)} for r in rows],
    }
    result["pareto"] = [_brief(r) for r in pareto_front(result["rows"])]
    result["targets"] = targets(result["rows"], baseline.get("prompt_accuracy"))
    write_result(args.json_path, result)
    if args.png:
        save_plot(result["rows"], args.png, f"{workload.description.get('model')}, {len(workload.prompts)} prompts")
    print(format_table(result["rows"]))
    print(f"targets: {result['targets']}")
    return 0
