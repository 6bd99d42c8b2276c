"""Benchmark block-sparse attention kernels against dense SDPA and FlexAttention.

(``--mode call`` times each pattern's whole routed call at real model geometries instead:
``eval/bench_attention_call.py``.)

    python eval/bench_attention_kernels.py --device cuda --shape all --json out.json
    python eval/bench_attention_kernels.py --device cpu --shape tiny

Imports only torch, triton, numpy and accel.attention.kernels (the GPU machine has no
diffusers). For each shape and density it builds one random layout that keeps
each query block's diagonal key block (so no row is empty), then times:
  triton      our block-sparse kernel (CUDA only)
  flex        compiled FlexAttention with the same block mask
  sdpa_flash, sdpa_cudnn   dense torch SDPA backends (once per shape, density 1.0)
  triton_int8     our quantized kernel, INT8 QK^T, PV in the input dtype (CUDA only)
  triton_int8fp8  the same with P and V in FP8 (CUDA capability 8.9+ only)
  sageattention   the PyPI package's sageattn, dense, when it imports (CUDA only)
  xformers        xformers.ops.memory_efficient_attention, dense, where it has an operator
Quantized rows also carry cosine_vs_fp32 / rel_l1_vs_fp32: their output against exact fp32
attention under the same layout, on the spot-checked query blocks; the quantization pre-pass
(unfused torch) is inside their timed call.
tflops_effective counts only the kept score entries (4 * D flops each, QK^T
and PV), so a sparse run is credited with the work it really does;
speedup_vs_sdpa is the best dense SDPA time of the same run divided by ms.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from accel.base.cli_args import integer, number, output_path
from accel.attention.kernels import (BlockLayout, block_sparse_attention_flex, block_sparse_attention_quant_triton,
                                     block_sparse_attention_reference, block_sparse_attention_triton, fp8_supported,
                                     quant_triton_supported, quantized_attention_reference, triton_supported)

try:
    import triton
    import triton.testing
except ImportError:
    triton = None

SHAPES = {
    "tiny": {"batch": 1, "seq": 1024, "heads": 2, "head_dim": 64, "block": 64},
    "wan480": {"batch": 1, "seq": 32760, "heads": 12, "head_dim": 128, "block": 128},
    "wan720": {"batch": 1, "seq": 75600, "heads": 12, "head_dim": 128, "block": 128},
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def random_layout(seq: int, heads: int, block: int, density: float, device, seed: int = 0) -> BlockLayout:
    """Per-head random layout keeping round(density * blocks) key blocks per query
    block, always including the diagonal block."""
    num_blocks = math.ceil(seq / block)
    keep = max(1, min(num_blocks, round(density * num_blocks)))
    gen = torch.Generator().manual_seed(seed)
    priority = torch.rand(1, heads, num_blocks, num_blocks, generator=gen)
    diagonal = torch.arange(num_blocks)
    priority[:, :, diagonal, diagonal] = 2.0  # above any rand() value, so always kept
    chosen = priority.topk(keep, dim=-1).indices
    mask = torch.zeros(1, heads, num_blocks, num_blocks, dtype=torch.bool).scatter_(-1, chosen, True)
    return BlockLayout.from_dense_mask(mask, block, block, seq, seq).to(device)


def _time_ms(fn, device: str, repeats: int) -> float:
    """Median milliseconds per call after warm-up."""
    if device == "cuda":
        # do_bench flushes L2 between calls, so repeated calls cannot reuse
        # cached K/V the way a single real attention call could not either.
        return float(triton.testing.do_bench(fn, warmup=25, rep=max(repeats, 1) * 10, return_mode="median"))
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def _sdpa_backends(device: str):
    from torch.nn.attention import SDPBackend
    names = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION"}
    return {name: getattr(SDPBackend, attr) for name, attr in names.items()
            if hasattr(SDPBackend, attr) and (device == "cuda" or name == "sdpa_flash")}


def _spot_blocks(out: torch.Tensor, q, k, v, layout: BlockLayout, reference):
    """(out rows, reference rows) over the first, middle and last query blocks (the last one
    is ragged at Wan lengths); the reference of the whole sequence would not fit in memory.
    Query tiles never straddle layout blocks, so a sliced quantized reference sees the same
    Q quantization blocks as the full call."""
    got, expected = [], []
    for block in sorted({0, layout.num_q_blocks // 2, layout.num_q_blocks - 1}):
        part = layout.query_block_slice(block, block + 1)
        rows = slice(block * layout.block_q, block * layout.block_q + part.q_len)
        got.append(out[:, rows].float())
        expected.append(reference(q[:, rows], k, v, part).float())
    return torch.cat(got, dim=1), torch.cat(expected, dim=1)


def _spot_check_error(out: torch.Tensor, q, k, v, layout: BlockLayout, reference=None) -> float:
    """Max |out - reference| over the spot-checked query blocks."""
    got, expected = _spot_blocks(out, q, k, v, layout, reference or block_sparse_attention_reference)
    return (got - expected).abs().max().item()


def _accuracy_vs_fp32(out: torch.Tensor, q, k, v, layout: BlockLayout) -> dict:
    """Cosine similarity and relative L1 error against exact fp32 attention (spot blocks)."""
    def exact(qs, ks, vs, part):
        return block_sparse_attention_reference(qs.float(), ks.float(), vs.float(), part)
    got, expected = (x.double().flatten() for x in _spot_blocks(out, q, k, v, layout, exact))
    return {"cosine_vs_fp32": torch.nn.functional.cosine_similarity(got, expected, dim=0).item(),
            "rel_l1_vs_fp32": ((got - expected).abs().sum() / expected.abs().sum()).item()}


def _quantized_candidates(q, k, v, layout: BlockLayout) -> dict:
    """backend -> (call, simulated reference) for the quantized kernel's PV modes this device runs."""
    candidates = {}
    for backend, pv in (("triton_int8", "input"), ("triton_int8fp8", "fp8")):
        if q.device.type != "cuda" or not quant_triton_supported(q, pv)[0]:
            continue
        if pv == "fp8" and not fp8_supported(q.device):
            continue
        candidates[backend] = (lambda pv=pv: block_sparse_attention_quant_triton(q, k, v, layout, pv=pv),
                               lambda qs, ks, vs, part, pv=pv: quantized_attention_reference(qs, ks, vs, part, pv=pv))
    return candidates


def _sageattention():
    """The PyPI sageattention's sageattn, or None when it does not import."""
    try:
        from sageattention import sageattn
    except Exception:  # absent, or built for another torch/CUDA: no row, not a failure
        return None
    return sageattn


def _xformers():
    """xformers' memory_efficient_attention, or None when it does not import."""
    try:
        from xformers.ops import memory_efficient_attention
    except Exception:  # absent, or built for another torch/CUDA
        return None
    return memory_efficient_attention


def run_attention_kernel_bench(device: str, shapes: list, densities=(1.0, 0.5, 0.25, 0.1),
                               dtype: torch.dtype | None = None, repeats: int = 10) -> list[dict]:
    """Time every available backend for each named shape and density; one dict per measurement."""
    if dtype is None:
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    common = {"device_name": device_name, "torch": torch.__version__,
              "triton": triton.__version__ if triton else None, "dtype": str(dtype).replace("torch.", "")}
    rows: list[dict] = []
    for shape_name in shapes:
        shape = SHAPES[shape_name]
        batch, seq, heads, head_dim = shape["batch"], shape["seq"], shape["heads"], shape["head_dim"]
        gen = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(batch, seq, heads, head_dim, device=device, dtype=dtype, generator=gen)
                   for _ in range(3))
        dense_flops = 4.0 * batch * heads * head_dim * seq * seq

        def add_row(backend, density, ms, **extra):
            rows.append({"shape": shape_name, **common, "density": density, "backend": backend, "ms": ms,
                         "tflops_effective": dense_flops * density / (ms * 1e-3) / 1e12, **extra})

        # Dense SDPA wants (B, H, S, D); transposing outside the timed call keeps
        # its layout change out of its time, favouring the baseline.
        qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
        sdpa_out = None
        for backend, sdpa_backend in _sdpa_backends(device).items():
            from torch.nn.attention import sdpa_kernel

            def run_sdpa(sdpa_backend=sdpa_backend):
                with sdpa_kernel(sdpa_backend):
                    return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)
            try:
                with torch.no_grad():
                    out = run_sdpa()
                    ms = _time_ms(run_sdpa, device, repeats)
            except RuntimeError as error:  # backend not built / not supported for this input
                print(f"[{shape_name}] {backend} unavailable: {str(error).splitlines()[0][:120]}")
                continue
            sdpa_out = out.transpose(1, 2) if sdpa_out is None else sdpa_out
            add_row(backend, 1.0, ms)
        del qt, kt, vt

        sageattn = _sageattention() if device == "cuda" else None
        if sageattn is not None:
            def run_sage():
                return sageattn(q, k, v, tensor_layout="NHD", is_causal=False)
            try:
                with torch.no_grad():
                    full = BlockLayout.full(shape["block"], shape["block"], seq, seq, device)
                    extra = _accuracy_vs_fp32(run_sage(), q, k, v, full)
                    add_row("sageattention", 1.0, _time_ms(run_sage, device, repeats), **extra)
            except Exception as error:  # an old Triton kernel may not compile on this GPU/Triton
                print(f"[{shape_name}] sageattention unavailable: {str(error).splitlines()[0][:120]}")

        xformers_attention = _xformers()
        if xformers_attention is not None:
            try:
                with torch.no_grad():
                    out = xformers_attention(q, k, v)  # (B, S, H, D): its layout is ours
                    extra = {} if sdpa_out is None else {
                        "max_abs_err_vs_sdpa": (out.float() - sdpa_out.float()).abs().max().item()}
                    add_row("xformers", 1.0, _time_ms(lambda: xformers_attention(q, k, v), device, repeats), **extra)
            except (NotImplementedError, RuntimeError) as error:  # no operator for this device/dtype
                print(f"[{shape_name}] xformers unavailable: {str(error).splitlines()[0][:120]}")

        for density in densities:
            layout = random_layout(seq, heads, shape["block"], density, device)
            kept = layout.density()
            candidates = {"flex": (lambda: block_sparse_attention_flex(q, k, v, layout), None)}
            if triton_supported(q)[0]:
                candidates["triton"] = (lambda: block_sparse_attention_triton(q, k, v, layout), None)
            candidates.update(_quantized_candidates(q, k, v, layout))
            for backend, (fn, reference) in candidates.items():
                with torch.no_grad():
                    out = fn()
                    error = _spot_check_error(out, q, k, v, layout, reference)
                    extra = {"max_abs_err_vs_reference": error}
                    if reference is not None:
                        extra.update(_accuracy_vs_fp32(out, q, k, v, layout))
                    if density == 1.0 and sdpa_out is not None:
                        extra["max_abs_err_vs_sdpa"] = (out.float() - sdpa_out.float()).abs().max().item()
                    del out
                    ms = _time_ms(fn, device, repeats)
                add_row(backend, kept, ms, target_density=density, **extra)
        del q, k, v, sdpa_out
        if device == "cuda":
            torch.cuda.empty_cache()

    for shape_name in shapes:
        dense_times = [r["ms"] for r in rows if r["shape"] == shape_name and r["backend"].startswith("sdpa")]
        best = min(dense_times) if dense_times else None
        for row in rows:
            if row["shape"] == shape_name:
                row["speedup_vs_sdpa"] = best / row["ms"] if best else None
    return rows


def format_table(rows: list[dict]) -> str:
    header = f"{'shape':8} {'backend':14} {'density':>7} {'ms':>10} {'TFLOP/s':>8} {'vs sdpa':>7} {'max err':>9}"
    lines = [header, "-" * len(header)]
    for r in rows:
        err = r.get("max_abs_err_vs_reference")
        speedup = f"{r['speedup_vs_sdpa']:.2f}x" if r["speedup_vs_sdpa"] else "-"
        lines.append(f"{r['shape']:8} {r['backend']:14} {r['density']:7.3f} {r['ms']:10.3f} "
                     f"{r['tflops_effective']:8.2f} {speedup:>7} {'-' if err is None else f'{err:.2e}':>9}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="accel bench attention", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", choices=(*SHAPES, "all"), default="tiny")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                        help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--densities", type=number(0, 1, low_inclusive=False), nargs="+", default=[1.0, 0.5, 0.25, 0.1])
    parser.add_argument("--repeats", type=integer(1), default=10)
    parser.add_argument("--json", dest="json_path", type=output_path, default=None, help="write the rows to this file")
    parser.add_argument("--mode", choices=("kernels", "call"), default="kernels",
                        help="kernels: the kernels alone on random layouts (default); call: each pattern's whole "
                             "routed call (plan, reorder, kernel, restore) at real model geometries "
                             "(eval/bench_attention_call.py)")
    call = parser.add_argument_group("--mode call")
    call.add_argument("--geometry", nargs="+", default=["all"],
                      help="wan1.3b-480p-81f, wan14b-720p-81f, hunyuan-720p-129f, flux-1024, all (default) or "
                           "none (with --budget: the plan budgets alone)")
    call.add_argument("--patterns", nargs="+", default=None, help="default: every sparse pattern")
    call.add_argument("--heads", type=integer(1), default=None,
                      help="attention heads per call (default: the model's on cuda, 1 on cpu)")
    call.add_argument("--threads", type=integer(1), default=None, help="CPU threads (default: the cores not busy)")
    call.add_argument("--budget", action="store_true",
                      help="also each pattern's plan alone at the Wan 1.3B 480p shape with all 12 heads, "
                           "against the first-call and memory budgets")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device visible")
    if args.mode == "call":
        from accel.eval.bench_attention_call import GEOMETRIES, PATTERNS, main as call_main

        unknown = [g for g in args.geometry if g not in ("all", "none") and g not in GEOMETRIES] + \
            [p for p in args.patterns or () if p not in PATTERNS]
        if unknown:
            parser.error(f"unknown geometry or pattern {unknown[0]!r}; geometries: {', '.join(GEOMETRIES)}; "
                         f"patterns: {', '.join(PATTERNS)}")
        return call_main(args)
    shapes = list(SHAPES) if args.shape == "all" else [args.shape]
    rows = run_attention_kernel_bench(args.device, shapes, tuple(args.densities),
                                      DTYPES[args.dtype] if args.dtype else None, args.repeats)
    print(format_table(rows))
    if args.json_path:
        with open(args.json_path, "w") as handle:
            json.dump(rows, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
