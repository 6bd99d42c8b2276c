"""The cases of tests/test_context_parallel.py, and the worker each rank runs under torchrun.

    python -m torch.distributed.run --nproc_per_node=2 tests/context_parallel_cases.py \
        --family wan --names attention=radial cache=fbcache --out ranks.pt [--patch-first]

A script, not a test module, so ranks start it by path whatever pytest's import mode.
"""
import argparse

import torch
import torch.distributed as dist

import accel
from accel.attention.patterns import SPARSE_PATTERNS
from accel.pipelines.tiny import build_tiny_pipeline, tiny_call_kwargs

WORLD = 2
STEPS = 5
ATOL = 1e-5


def cpu_shim() -> None:
    """Test only: one 'accelerator' per process, so diffusers picks the CPU device for each rank."""
    torch.accelerator.device_count = lambda: 1


def attention_cases(family):
    cases = {"dense": "dense", "int8": "int8"}
    for name in SPARSE_PATTERNS.names():
        # small blocks so the tiny models' 16-48 visual tokens are really sparse; no dense warm-up
        extra = {"block_size": 16, "dense_warmup": 0.0, "dense_layers": 0, "backend": "torch",
                 **({"similarity_threshold": -1.0} if name == "topk" else {}),
                 **({"q_clusters": 8, "k_clusters": 8} if name == "cluster" else {})}
        cases[name] = SPARSE_PATTERNS.get(name).Config(density=0.3, **extra)
    return cases


def cache_cases(family, model_class):
    from accel.caching import EasyCacheConfig, FBCacheConfig, FixedCacheConfig, MagCacheConfig, TeaCacheConfig

    ratios = {"kind": "magcache", "model_class": model_class, "num_steps": STEPS,
              "ratios": {b: [0.9] * STEPS for b in ("cond", "uncond", "cond_uncond")}}
    teacache = {"kind": "teacache", "model_class": model_class, "num_steps": STEPS,
                "coefficients": [0.0, 0.0, 0.0, 1.0, 0.0]}
    return {"fbcache": FBCacheConfig(threshold=THRESHOLDS[family]["fbcache"]),
            "teacache": TeaCacheConfig(threshold=THRESHOLDS[family]["teacache"], calibration=teacache),
            "magcache": MagCacheConfig(threshold=0.25, calibration=ratios),
            "easycache": EasyCacheConfig(threshold=THRESHOLDS[family]["easycache"], warmup_ratio=0.0),
            "fixed": FixedCacheConfig(interval=2, forecast="taylor", order=1, schedule="uniform")}


# thresholds at which the data-driven rules reuse some steps and compute others on these models
THRESHOLDS = {"wan": {"fbcache": 0.1, "teacache": 1.0, "easycache": 0.2},
              "flux": {"fbcache": 0.3, "teacache": 0.2, "easycache": 0.3}}


def cases(family, model_class):
    return {**{f"attention={k}": {"attention": v} for k, v in attention_cases(family).items()},
            **{f"cache={k}": {"cache": v} for k, v in cache_cases(family, model_class).items()}}


# FLUX at 4x the tiny builder's area: 64 image tokens, 4 blocks of 16, so patterns can skip some
SIZE = {"flux": {"height": 128, "width": 128}}


def run(pipe, family):
    out = pipe(**{**tiny_call_kwargs(family, steps=STEPS), "output_type": "latent", **SIZE.get(family, {})})
    return torch.as_tensor(out.frames if hasattr(out, "frames") else out.images)


def record_decisions(handle):
    """[(step, branch, reused)] of the cache, in call order."""
    rule = handle.methods["cache"].engine.rule
    seen, committed = [], rule.committed

    def record(state, probe, reused):
        seen.append((probe.step, probe.branch, reused))
        return committed(state, probe, reused)

    rule.committed = record
    return seen


def patched_run(family, patch_kwargs, parallel=None, parallel_first=True):
    """(output, summary, decisions, output after remove()) of one fresh tiny pipeline."""
    pipe = build_tiny_pipeline(family, seed=0)
    if parallel is not None and parallel_first:
        pipe.transformer.enable_parallelism(config=parallel())
    handle = accel.patch(pipe, **patch_kwargs)
    if parallel is not None and not parallel_first:
        pipe.transformer.enable_parallelism(config=parallel())
    decisions = record_decisions(handle) if "cache" in patch_kwargs else None
    out = run(pipe, family)
    summary = handle.summary()
    handle.remove()
    return out, summary, decisions, run(pipe, family)


def rule_decision_on_a_slice(rank):
    """fbcache's decision on a rank's slice of a change that sits all on rank 0's half: 50% there,
    none on rank 1's, 25% over the whole tensor, under a 0.3 threshold. Each rank alone would
    decide differently (compute / reuse); from the group's means both reuse."""
    from accel.caching.distributed import GroupStats
    from accel.caching.indicators import FirstBlockRule, Probe

    previous = torch.ones(1, 8, 4)
    current = previous.clone()
    current[:, :4] *= 1.5
    stats = GroupStats(dist.group.WORLD)
    part = slice(rank * 4, rank * 4 + 4)
    rule = FirstBlockRule(threshold=0.3)
    state = rule.new_state()
    first = Probe(step=0, first_residual=previous[:, part], stats=stats)
    rule.propose(state, first)
    rule.committed(state, first, False)
    return rule.propose(state, Probe(step=1, first_residual=current[:, part], stats=stats))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--family", required=True)
    parser.add_argument("--names", nargs="+", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--patch-first", action="store_true")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    cpu_shim()
    torch.set_num_threads(1)
    from diffusers import ContextParallelConfig

    def parallel():
        return ContextParallelConfig(ulysses_degree=dist.get_world_size())

    rank = dist.get_rank()
    try:
        results = {"rule_agrees": rule_decision_on_a_slice(rank)}
        pipe = build_tiny_pipeline(args.family, seed=0)
        pipe.transformer.enable_parallelism(config=parallel())
        results["unpatched"] = run(pipe, args.family)
        all_cases = cases(args.family, type(pipe.transformer).__name__)
        for name in args.names:
            results[name] = patched_run(args.family, all_cases[name], parallel, not args.patch_first)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, results)
        if rank == 0:
            torch.save(gathered, args.out)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
