"""accel inside diffusers' context parallelism, on CPU: 2 processes on gloo, the real diffusers path.

diffusers' ``enable_parallelism`` picks each rank's device by ``rank % torch.accelerator.device_count()``,
which is 0 on a machine without an accelerator. ``_cpu_shim`` (here, never in the library) says 1,
so the device is the CPU and every other step (meshes, split/gather hooks, the all-to-all of
Ulysses attention) is diffusers' own code on gloo.

For a tiny Wan and a tiny FLUX, each case runs in both ranks and in one process, and:
- the 2-rank output equals the 1-process output of the same configuration (same plan),
- sparse patterns run sparse (not the fallback) and report a realised density below 1 on every rank,
- cache rules make identical decisions on every rank, equal to one process's,
- ``remove()`` gives back the never-patched 2-rank output, bit for bit, on every rank.
"""
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import accel
from accel.attention.patterns import SPARSE_PATTERNS
from accel.pipelines.tiny import build_tiny_pipeline, tiny_call_kwargs

pytest.importorskip("diffusers.hooks.context_parallel")

WORLD = 2
STEPS = 5
ATOL = 1e-5


def _cpu_shim() -> None:
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


def _worker(rank, port, family, names, parallel_first, path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    _cpu_shim()
    torch.set_num_threads(1)
    from diffusers import ContextParallelConfig

    def parallel():
        return ContextParallelConfig(ulysses_degree=WORLD)

    try:
        results = {"rule_agrees": rule_decision_on_a_slice(rank)}
        pipe = build_tiny_pipeline(family, seed=0)
        pipe.transformer.enable_parallelism(config=parallel())
        results["unpatched"] = run(pipe, family)
        all_cases = cases(family, type(pipe.transformer).__name__)
        for name in names:
            results[name] = patched_run(family, all_cases[name], parallel, parallel_first)
        gathered = [None] * WORLD
        dist.all_gather_object(gathered, results)
        if rank == 0:
            torch.save(gathered, path)
    finally:
        dist.destroy_process_group()


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


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_ranks(family, names, parallel_first=True):
    """Each rank's results of the named cases: a list of WORLD dicts."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "ranks.pt")
        mp.spawn(_worker, args=(_free_port(), family, names, parallel_first, path), nprocs=WORLD)
        return torch.load(path, weights_only=False)


def one_process(family, names):
    model_class = type(build_tiny_pipeline(family, seed=0).transformer).__name__
    all_cases = cases(family, model_class)
    return {name: patched_run(family, all_cases[name]) for name in names}


@pytest.mark.parametrize("family", ["wan", "flux"])
def test_every_method_under_ulysses_equals_one_process(family):
    model_class = type(build_tiny_pipeline(family, seed=0).transformer).__name__
    names = list(cases(family, model_class))
    ranks = two_ranks(family, names)
    single = one_process(family, names)
    unpatched = run(build_tiny_pipeline(family, seed=0), family)
    for rank in ranks:
        assert rank["rule_agrees"] is True
        torch.testing.assert_close(rank["unpatched"], unpatched, atol=ATOL, rtol=0)
    sparse_on_rank = [0] * WORLD
    for name in names:
        out, summary, decisions, _ = single[name]
        for index, rank in enumerate(ranks):
            rank_out, rank_summary, rank_decisions, restored = rank[name]
            where = f"{family} {name} rank {index}"
            torch.testing.assert_close(rank_out, out, atol=ATOL, rtol=0, msg=lambda m: f"{where}: {m}")
            assert torch.equal(restored, rank["unpatched"]), f"{where}: remove() did not restore exactly"
            assert rank_summary["parallel"] == {"ulysses": WORLD, "ring": 1, "world_size": WORLD, "rank": index}
            assert summary["parallel"] is None
            if decisions is not None:
                assert rank_decisions == decisions, f"{where}: reuse decisions differ from one process"
                assert any(r for *_, r in decisions) and not all(r for *_, r in decisions), \
                    f"{name}: the case should reuse some calls and compute others"
            counters = rank_summary["methods"].get("attention")
            if counters is not None and name.split("=")[1] in SPARSE_PATTERNS.names():
                counters, single_counters = counters["counters"], summary["methods"]["attention"]["counters"]
                assert counters["fallback_calls"] == single_counters["fallback_calls"], where
                if single_counters["sparse_calls"]:
                    assert counters["sparse_calls"] == counters["calls"] > 0, where
                    assert counters["mean_density"] == pytest.approx(single_counters["mean_density"]), where
                    sparse_on_rank[index] += counters["mean_density"] < 1.0
    # on FLUX's single frame the video-only patterns step aside (on one process too)
    assert min(sparse_on_rank) >= 3, f"{family}: patterns that skipped blocks on each rank: {sparse_on_rank}"


@pytest.mark.parametrize("family,names", [("wan", ["attention=radial", "attention=cluster", "cache=fbcache"]),
                                          ("flux", ["attention=topk", "cache=teacache"])])
def test_patch_before_enable_parallelism(family, names):
    """accel.patch first, then enable_parallelism: the same outputs and decisions as one process."""
    ranks = two_ranks(family, names, parallel_first=False)
    single = one_process(family, names)
    for index, rank in enumerate(ranks):
        for name in names:
            out, summary, decisions, restored = rank[name]
            assert torch.equal(restored, rank["unpatched"]), f"{family} {name} rank {index}"
            assert summary["parallel"]["ulysses"] == WORLD
            torch.testing.assert_close(out, single[name][0], atol=ATOL, rtol=0)
            assert decisions == single[name][2]


def test_ring_attention_runs_diffusers_own_path():
    """Ring merges partial results by their log-sum-exp, which our kernels do not return: refused
    with the reason (diffusers' CPU backend has no ring path either, so only the rule is run here)."""
    from diffusers import ContextParallelConfig

    from accel.attention.context_parallel import RING, refusal
    from accel.base.context import TokenLayout

    q = torch.randn(1, 24, 2, 16)
    layout = TokenLayout(grid=(3, 4, 4))
    assert refusal(ContextParallelConfig(ring_degree=2), q, q, q, None, layout) == RING
    assert refusal(ContextParallelConfig(ulysses_degree=2), q, q, q, None, layout) is None
    assert "mask" in refusal(ContextParallelConfig(ulysses_degree=2), q, q, q, torch.ones(1, 1, 24, 48), layout)
    assert "heads" in refusal(ContextParallelConfig(ulysses_degree=4), torch.randn(1, 12, 2, 16), q, q, None, layout)
    grad = torch.randn(1, 24, 2, 16, requires_grad=True)
    assert "grad" in refusal(ContextParallelConfig(ulysses_degree=2), grad, q, q, None, layout)


def test_gathered_sequence_is_put_in_one_process_order():
    """Joint attention on 2 ranks gathers each rank's (text, image) slice in turn; the method sees
    the one-process order, and a length the layout does not describe is refused."""
    from accel.attention.context_parallel import one_process_order
    from accel.base.context import TokenLayout

    image = [f"v{i}" for i in range(8)]
    prefix = TokenLayout(grid=(1, 2, 4), text_tokens=2, text_position="prefix")
    gathered = ["t0", *image[:4], "t1", *image[4:]]
    assert [gathered[i] for i in one_process_order(prefix, 2, 5)] == ["t0", "t1", *image]
    suffix = TokenLayout(grid=(1, 2, 4), text_tokens=2, text_position="suffix")
    gathered = [*image[:4], "t0", *image[4:], "t1"]
    assert [gathered[i] for i in one_process_order(suffix, 2, 5)] == [*image, "t0", "t1"]
    assert one_process_order(TokenLayout(grid=(3, 4, 4)), 2, 24) is None  # image only: already in order
    assert one_process_order(prefix, 2, 4) is False


def test_the_launch_example_under_torchrun(tmp_path):
    """docs/examples/context_parallel.py as the docs launch it, with the CPU shim as sitecustomize."""
    (tmp_path / "sitecustomize.py").write_text("import torch\ntorch.accelerator.device_count = lambda: 1\n")
    example = Path(__file__).resolve().parents[1] / "docs" / "examples" / "context_parallel.py"
    out = tmp_path / "wan.mp4"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
         str(example), "--model", "tiny:wan", "--attention", "radial", "--cache", "fbcache", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in range(WORLD):
        assert f"context parallel: ulysses 2, ring 1, world_size 2, rank {rank}" in result.stdout, result.stdout
    assert out.stat().st_size > 0
