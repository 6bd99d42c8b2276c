"""accel inside diffusers' context parallelism, on CPU: 2 processes on gloo, the real diffusers path.

diffusers' ``enable_parallelism`` picks each rank's device by ``rank % torch.accelerator.device_count()``,
which is 0 on a machine without an accelerator. ``context_parallel_cases.cpu_shim`` (test code,
never in the library) says 1, so the device is the CPU and every other step (meshes, split/gather
hooks, the all-to-all of Ulysses attention) is diffusers' own code on gloo. Each rank runs
``tests/context_parallel_cases.py`` under torchrun.

For a tiny Wan and a tiny FLUX, each case runs in both ranks and in one process, and:
- the 2-rank output equals the 1-process output of the same configuration (same plan),
- sparse patterns run sparse (not the fallback) and report a realised density below 1 on every rank,
- cache rules make identical decisions on every rank, equal to one process's,
- ``remove()`` gives back the never-patched 2-rank output, bit for bit, on every rank.
"""
import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from accel.attention.patterns import SPARSE_PATTERNS
from accel.pipelines.tiny import build_tiny_pipeline

pytest.importorskip("diffusers.hooks.context_parallel")

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("context_parallel_cases", HERE / "context_parallel_cases.py")
cp_cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cp_cases)
WORLD, ATOL, cases, run, patched_run = cp_cases.WORLD, cp_cases.ATOL, cp_cases.cases, cp_cases.run, cp_cases.patched_run


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_ranks(family, names, parallel_first=True):
    """Each rank's results of the named cases: a list of WORLD dicts."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "ranks.pt")
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}",
                   f"--master_port={_free_port()}", str(HERE / "context_parallel_cases.py"),
                   "--family", family, "--out", path, "--names", *names]
        result = subprocess.run(command + ([] if parallel_first else ["--patch-first"]), capture_output=True,
                                text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=900)
        assert result.returncode == 0, result.stderr[-4000:]
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
