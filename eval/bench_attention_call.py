"""``accel bench attention --mode call``: the whole routed attention call of every sparse pattern at
the token geometries of real models, against dense attention at the same shape.

The kernel bench (``--mode kernels``) times the block-sparse kernel alone on random layouts; a user
pays for more: the pattern's plan (pooling, scoring, clustering), the token reordering, the kernel
and the restore to the model's order. This mode calls the registered method exactly as a patched
transformer's attention module does (``method.run(q, k, v, ctx)`` with the model's token layout and
a step past the dense warm-up) and times each part through the method's phase timer, on the first
call (cold: plans built, kernels compiled) and on the next one (steady state: plans reused where
the pattern allows). Each (geometry, pattern) runs in a fresh process, so the first call is really
the first and the peak memory (``ru_maxrss`` on the CPU, ``max_memory_allocated`` on CUDA) is its
own.

q/k/v are smooth in position as a video's are (random fields on a coarse grid, upsampled, plus a
direction per head that every token shares), so the content-dependent patterns (topk, cluster)
see structure rather than white noise. On the CPU the
geometries run with one head (``--heads``) so the whole table takes minutes; the
plan budget check (``--budget``) runs every pattern's plan alone at the Wan 1.3B 480p shape with its
full 12 heads and head dim 128.
"""
from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch


@dataclass(frozen=True)
class CallGeometry:
    grid: Tuple[int, int, int]  # latent frames, height, width in tokens after patching
    heads: int
    head_dim: int
    text: int = 0  # text tokens in the same sequence (joint attention)
    text_position: Optional[str] = None


# Latent grids after the VAE (8x spatial, 4x temporal) and patching (2x2): the shapes users run.
GEOMETRIES: Dict[str, CallGeometry] = {
    "wan1.3b-480p-81f": CallGeometry((21, 30, 52), 12, 128),  # 32,760 tokens
    "wan14b-720p-81f": CallGeometry((21, 45, 80), 40, 128),  # 75,600 tokens
    "hunyuan-720p-129f": CallGeometry((33, 45, 80), 24, 128, 256, "suffix"),  # 118,800 + 256 text
    "flux-1024": CallGeometry((1, 64, 64), 24, 128, 512, "prefix"),  # 4,096 + 512 text
}
PATTERNS = ("spatiotemporal", "radial", "tile_window", "topk", "cluster")
PHASES = ("plan", "reorder", "kernel", "restore")
# Plan budgets at the Wan 1.3B 480p shape on the CPU, stock allocator: first call, peak memory.
BUDGET_SECONDS, BUDGET_GB = 30.0, 3.0


def smooth_qkv(geom: CallGeometry, heads: int, dtype: torch.dtype, device: str, seed: int = 0):
    """q, k, v (1, tokens, heads, head_dim): coarse random fields upsampled over the grid (smooth in
    position, as a video's are), text tokens random, in the model's token order."""
    t, h, w = geom.grid
    out = []
    for i in range(3):
        gen = torch.Generator().manual_seed(seed + i)
        coarse = torch.randn(1, heads * geom.head_dim, max(1, t // 3 + 1), h // 3 + 1, w // 3 + 1, generator=gen)
        field = torch.nn.functional.interpolate(coarse, size=geom.grid, mode="trilinear", align_corners=False)
        # plus one direction per head shared by every token, as real queries and keys have (a
        # token's cosine to a distant one is about 0.5, not 0): without it no block looks self-similar
        shared = torch.randn(1, heads, geom.head_dim, generator=gen) * field.std()
        visual = field.view(heads, geom.head_dim, t * h * w).permute(2, 0, 1) + shared
        text = torch.randn(geom.text, heads, geom.head_dim, generator=gen) * field.std() + shared
        parts = (text, visual) if geom.text_position == "prefix" else (visual, text)
        out.append(torch.cat(parts)[None].to(device=device, dtype=dtype))
    return out


class PhaseClock:
    """The method's phase timer: milliseconds per phase, synchronised on CUDA."""

    def __init__(self, device: str):
        self.device, self.ms = device, {p: 0.0 for p in PHASES}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        self._sync()
        start = time.perf_counter()
        yield
        self._sync()
        self.ms[phase] += (time.perf_counter() - start) * 1e3

    def _sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()


def _peak_gb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def measure(name: str, geometry: Any, heads: int, device: str, dtype: torch.dtype, plan_only: bool = False,
            **config: Any) -> Dict[str, Any]:
    """One (geometry, pattern or "dense") row, in this process: first call and steady state.
    ``geometry``: a name in ``GEOMETRIES`` or a ``CallGeometry``; ``config``: the pattern's knobs."""
    import accel.attention  # noqa: F401  (registers the methods)
    from accel.attention.intercept import dense_attention
    from accel.attention.patterns import SPARSE_PATTERNS, geometry_of
    from accel.base.context import AttnContext, StepContext, TokenLayout
    from accel.base.registry import ATTENTION_METHODS

    geom = geometry if isinstance(geometry, CallGeometry) else GEOMETRIES[geometry]
    q, k, v = smooth_qkv(geom, heads, dtype, device)
    before_gb = _peak_gb(device)  # the inputs and the interpreter: what the call adds is measured from here
    layout = TokenLayout(grid=geom.grid, text_tokens=geom.text, text_position=geom.text_position)
    row: Dict[str, Any] = {"geometry": geometry if isinstance(geometry, str) else str(geom.grid),
                           "pattern": name, "tokens": q.shape[1], "heads": heads,
                           "model_heads": geom.heads, "head_dim": geom.head_dim, "device": device,
                           "dtype": str(dtype).replace("torch.", "")}
    method = None if name == "dense" else ATTENTION_METHODS.get(name)(SPARSE_PATTERNS.get(name).Config(**config))
    for call in ("first", "steady"):
        # a step past the dense warm-up, one layer past the dense layers: the call runs sparse
        ctx = AttnContext(layer_index=3, num_layers=30, site="blocks.3.attn1", kind="joint" if geom.text else "self",
                          heads=heads, layout=layout, step=StepContext(step_index=20 + (call == "steady"),
                                                                       num_steps=50))
        clock = PhaseClock(device)
        start = time.perf_counter()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a fallback's reason is kept below, once per row
            if method is None:
                dense_attention(q, k, v)
            elif plan_only:
                with clock("plan"):
                    method.pattern.block_layout(q, k, ctx, geometry_of(q.shape[1], layout)[0], None)
            else:
                method.phase_timer = clock
                method.run(q, k, v, ctx)
        if device == "cuda":
            torch.cuda.synchronize()
        total = (time.perf_counter() - start) * 1e3
        row[call] = {"total_ms": round(total, 1), **({} if method is None else
                                                      {f"{p}_ms": round(ms, 1) for p, ms in clock.ms.items()})}
    row["peak_memory_gb"] = round(_peak_gb(device), 3)
    row["added_memory_gb"] = round(row["peak_memory_gb"] - before_gb, 3)
    if method is not None and not plan_only:
        counters = method.counters()
        row["realised_density"] = counters.get("sparse_mean_density")
        row["asked_density"] = method.config.density
        row["fallback_calls"] = counters.get("fallback_calls")
        if method.fallback_reasons:
            row["fallback_reasons"] = sorted(method.fallback_reasons)
    return row


def measure_in_child(name: str, geometry: Any, heads: int, device: str, dtype: str, threads: Optional[int],
                     plan_only: bool = False, timeout: float = 3600, **config: Any) -> Dict[str, Any]:
    """``measure`` in a fresh interpreter: a cold first call and a peak memory of its own."""
    code = ("import json, sys, torch; from accel.eval.bench_attention_call import CallGeometry, measure; "
            f"torch.set_num_threads({threads or torch.get_num_threads()}); "
            f"print('ROW ' + json.dumps(measure({name!r}, {geometry!r}, {heads}, {device!r}, torch.{dtype}, "
            f"{plan_only}, **{config!r})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    for line in done.stdout.splitlines():
        if line.startswith("ROW "):
            return json.loads(line[4:])
    return {"geometry": geometry, "pattern": name, "error": (done.stderr or done.stdout).strip()[-600:]}


def run(geometries: List[str], patterns: List[str], heads: Optional[int], device: str, dtype: str,
        threads: Optional[int], log=print) -> List[Dict[str, Any]]:
    rows = []
    for geometry in geometries:
        n = heads or GEOMETRIES[geometry].heads
        for name in ("dense", *patterns):
            row = measure_in_child(name, geometry, n, device, dtype, threads)
            rows.append(row)
            log(json.dumps(row))
    dense = {r["geometry"]: r for r in rows if r["pattern"] == "dense" and "error" not in r}
    for row in rows:
        base = dense.get(row["geometry"])
        if base and "error" not in row and row["pattern"] != "dense":
            row["steady_vs_dense"] = round(base["steady"]["total_ms"] / row["steady"]["total_ms"], 3)
        steady = row.get("steady") or {}
        if steady.get("kernel_ms"):  # the GPU budget: the plan under 10% of the kernel in steady state
            row["plan_share_of_kernel"] = round(steady["plan_ms"] / steady["kernel_ms"], 4)
    return rows


def plan_budget(patterns: List[str], device: str, threads: Optional[int], log=print) -> Dict[str, Any]:
    """Every pattern's plan alone at the Wan 1.3B 480p shape, all 12 heads, fp32 on the CPU."""
    rows = []
    for name in patterns:
        row = measure_in_child(name, "wan1.3b-480p-81f", 12, device, "float32", threads, plan_only=True)
        if "error" not in row:
            row["within_budget"] = (row["first"]["plan_ms"] / 1e3 < BUDGET_SECONDS
                                    and (device == "cuda" or row["peak_memory_gb"] < BUDGET_GB))
        rows.append(row)
        log(json.dumps(row))
    return {"seconds": BUDGET_SECONDS, "peak_gb": BUDGET_GB, "rows": rows}


def format_table(rows: List[Dict[str, Any]]) -> str:
    head = (f"{'geometry':18} {'pattern':14} {'heads':>5} {'density':>7} | first: {'plan':>8} {'total':>9} | "
            f"steady: {'plan':>8} {'reorder':>8} {'kernel':>9} {'restore':>8} {'total':>9} | {'vs dense':>8} {'peak GB':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['geometry']:18} {r['pattern']:14} error: {r['error'][-120:]}")
            continue
        first, steady = r["first"], r["steady"]
        get = lambda d, k: f"{d[k]:8.1f}" if k in d else f"{'-':>8}"  # noqa: E731
        density = f"{r['realised_density']:.3f}" if r.get("realised_density") is not None else "-"
        ratio = f"{r['steady_vs_dense']:.2f}x" if r.get("steady_vs_dense") else "-"
        lines.append(f"{r['geometry']:18} {r['pattern']:14} {r['heads']:5d} {density:>7} | first: "
                     f"{get(first, 'plan_ms')} {first['total_ms']:9.1f} | steady: {get(steady, 'plan_ms')} "
                     f"{get(steady, 'reorder_ms')} {get(steady, 'kernel_ms'):>9} {get(steady, 'restore_ms')} "
                     f"{steady['total_ms']:9.1f} | {ratio:>8} {r['peak_memory_gb']:7.2f}")
    return "\n".join(lines)


def main(args) -> int:
    """Called by ``accel bench attention --mode call`` with its parsed arguments."""
    from accel.base.cli_args import set_threads

    device = args.device
    threads = set_threads(args.threads) if device == "cpu" else None
    dtype = args.dtype and {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[args.dtype]
    dtype = dtype or ("bfloat16" if device == "cuda" else "float32")
    geometries = {"all": list(GEOMETRIES), "none": []}.get(args.geometry[0], args.geometry)  # none: --budget alone
    patterns = args.patterns or list(PATTERNS)
    heads = args.heads if args.heads is not None else (None if device == "cuda" else 1)
    result: Dict[str, Any] = {"what": "whole routed attention call per pattern (plan, reorder, kernel, restore) "
                                      "against dense attention, first call and steady state",
                              "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                              "threads": threads, "torch": torch.__version__}
    result["rows"] = run(geometries, patterns, heads, device, dtype, threads)
    if result["rows"]:
        print(format_table(result["rows"]))
    if args.budget:
        result["plan_budget"] = plan_budget(patterns, device, threads)
    if args.json_path:
        with open(args.json_path, "w") as handle:
            json.dump(result, handle, indent=2)
    return 0
