"""Quantized attention kernels: the pre-pass, the simulated-quantization reference, the Triton kernel.

The kernel runs in Triton's interpreter in a child process (TRITON_INTERPRET=1 must precede
Triton's first import; see test_block_sparse_kernels.py) and must match the simulated reference,
which replays its tiles, running max and P rounding. INT8 tl.dot is exact in the interpreter and
so is FP8 x FP8; the interpreter's fp32 -> fp8 cast is not (it ORs the mantissa carry into the
exponent: 0.49 -> 0.25), so the kernel rounds P onto the e4m3 grid itself there, and the FP8
cases below hold the kernel to the reference bit for bit where the output dtype allows.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from accel.attention.kernels import (BlockLayout, block_sparse_attention_reference, quant_triton_supported,
                                     quantize_qkv, quantized_attention_reference, quantized_block_sparse_attention,
                                     resolve_pv)
from accel.attention.kernels.quantize import FP8_DTYPE, quantize_fp8_channels, quantize_int8_blocks

DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
TOLERANCE = {"fp32": 1e-5, "fp16": 1e-3}  # kernel vs simulated reference, outputs of N(0, 1) values

# id: (batch, q_len, kv_len, heads, head_dim, block_q, block_k, dtype, layout kind, pv, launch_config)
KERNEL_CASES = {
    "odd_sq_ne_sk_d64_fp16": (2, 77, 130, 2, 64, 32, 32, "fp16", "random", "input", None),
    "odd_sk_gt_sq_d128_fp32": (1, 130, 77, 2, 128, 32, 32, "fp32", "random_per_head", "input", None),
    "full_d32_fp16": (1, 90, 70, 1, 32, 32, 32, "fp16", "full", "input", None),
    "d256_fp32": (1, 40, 50, 1, 256, 32, 32, "fp32", "random", "input", None),
    "fp8_full_d64_fp16": (1, 100, 90, 1, 64, 32, 32, "fp16", "full", "fp8", None),
    "fp8_per_head_d128_fp32": (1, 70, 150, 2, 128, 64, 64, "fp32", "random_per_head", "fp8", None),
    "fp8_sub_tiles_tail_first": (1, 50, 80, 1, 64, 64, 64, "fp16", "tail_first", "fp8",
                                 {"BLOCK_M": 32, "BLOCK_N": 32}),
}


def make_case(case_id: str):
    batch, q_len, kv_len, heads, head_dim, block_q, block_k, dtype_name, kind, pv, launch = KERNEL_CASES[case_id]
    gen = torch.Generator().manual_seed(sum(map(ord, case_id)))
    q = torch.randn(batch, q_len, heads, head_dim, generator=gen)
    # A channel offset on K, so smoothing has something to remove.
    k = torch.randn(batch, kv_len, heads, head_dim, generator=gen) + torch.randn(1, 1, heads, head_dim, generator=gen)
    v = torch.randn(batch, kv_len, heads, head_dim, generator=gen)
    k = torch.cat([k, v], dim=-1)[..., :head_dim]  # strided k: the kernel must honour strides
    q, k, v = (x.to(DTYPES[dtype_name]) for x in (q, k, v))
    num_q, num_k = math.ceil(q_len / block_q), math.ceil(kv_len / block_k)
    if kind == "full":
        layout = BlockLayout.full(block_q, block_k, q_len, kv_len)
    elif kind == "tail_first":
        indices = torch.tensor([[[[num_k - 1, 0]] * num_q]], dtype=torch.int32)
        layout = BlockLayout(indices, torch.full((1, 1, num_q), 2, dtype=torch.int32), block_q, block_k, q_len, kv_len)
    else:
        mask = torch.rand(batch, heads if kind == "random_per_head" else 1, num_q, num_k, generator=gen) < 0.5
        mask[0, 0, 0] = False  # an empty query block
        mask[..., -1, -1] = True  # the ragged corner tile
        layout = BlockLayout.from_dense_mask(mask, block_q, block_k, q_len, kv_len)
    return q, k, v, layout, pv, launch


def kernel_case_errors(case_id: str) -> dict:
    from accel.attention.kernels import block_sparse_attention_quant_triton
    q, k, v, layout, pv, launch = make_case(case_id)
    out = block_sparse_attention_quant_triton(q, k, v, layout, pv=pv, launch_config=launch)
    tiles = {"block_m": launch["BLOCK_M"], "block_n": launch["BLOCK_N"]} if launch else {}
    expected = quantized_attention_reference(q, k, v, layout, pv=pv, **tiles)
    exact = block_sparse_attention_reference(q.float(), k.float(), v.float(), layout)
    row_kept = layout.kv_counts.repeat_interleave(layout.block_q, dim=2)[..., : layout.q_len] > 0
    empty_rows = ~row_kept.expand(q.shape[0], q.shape[2], -1).transpose(1, 2)
    return {"vs_reference": (out.float() - expected.float()).abs().max().item(),
            "empty_rows_nonzero": out[empty_rows].abs().max().item() if empty_rows.any() else 0.0,
            "cosine_vs_exact": F.cosine_similarity(out.double().flatten(), exact.double().flatten(), dim=0).item()}


@pytest.fixture(scope="module")
def interpreter_results(run_cases_in_interpreter):
    return run_cases_in_interpreter(__file__)


@pytest.mark.parametrize("case_id", list(KERNEL_CASES))
def test_triton_interpreter_matches_simulated_reference(case_id, interpreter_results):
    if KERNEL_CASES[case_id][9] == "fp8" and FP8_DTYPE is None:
        pytest.skip("this torch build has no float8_e4m3fn, so FP8 PV cannot be simulated")
    errors = interpreter_results[case_id]
    assert "error" not in errors, errors.get("error")
    assert errors["vs_reference"] <= TOLERANCE[KERNEL_CASES[case_id][7]], errors
    assert errors["empty_rows_nonzero"] == 0.0, errors
    assert errors["cosine_vs_exact"] >= 0.995, errors  # tiny blocks: a loose sanity bound only


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case_id", list(KERNEL_CASES))
def test_triton_cuda_matches_simulated_reference(case_id):
    from accel.attention.kernels import block_sparse_attention_quant_triton
    q, k, v, layout, pv, launch = make_case(case_id)
    q, k, v = (x.cuda().half() for x in (q, k, v))
    if not quant_triton_supported(q, pv)[0]:
        pytest.skip(quant_triton_supported(q, pv)[1])
    tiles = {"block_m": launch["BLOCK_M"], "block_n": launch["BLOCK_N"]} if launch else {}
    out = block_sparse_attention_quant_triton(q, k, v, layout.to("cuda"), pv=pv, launch_config=launch)
    expected = quantized_attention_reference(q, k, v, layout.to("cuda"), pv=pv, **tiles)
    # exp2 is approximate on the GPU, so a few P values round to a neighbouring FP8 value.
    assert (out.float() - expected.float()).abs().max().item() <= (2e-2 if pv == "fp8" else 2e-3)


# -- pre-pass -----------------------------------------------------------------------------------

def test_int8_blocks_range_scales_and_ragged_tail():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 70, 3, 32, generator=gen)
    x[:, 64:] *= 0.01  # the ragged tail block gets its own, much smaller scale
    quantized, scale = quantize_int8_blocks(x, 32)
    assert quantized.dtype == torch.int8 and quantized.shape == x.shape and scale.shape == (2, 3, 3)
    assert int(quantized.abs().max()) == 127 and int(quantized.min()) >= -127
    blocks = [slice(0, 32), slice(32, 64), slice(64, 70)]
    for index, rows in enumerate(blocks):
        absmax = x[:, rows].abs().amax(dim=(1, 3))  # (B, H)
        torch.testing.assert_close(scale[:, :, index], absmax / 127)
        dequantized = quantized[:, rows].float() * scale[:, :, index][:, None, :, None]
        assert bool(((dequantized - x[:, rows]).abs() <= scale[:, :, index][:, None, :, None] / 2 + 1e-7).all())


def test_prepass_smooths_k_folds_the_softmax_scale_and_keeps_fp8_v_within_half_an_ulp():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 80, 2, 64, generator=gen) for _ in range(3))
    offset = 10 * torch.randn(1, 1, 2, 64, generator=gen)
    plain = quantize_qkv(q, k, v, 32, 32, scale=0.1)
    shifted = quantize_qkv(q, k + offset, v, 32, 32, scale=0.1)
    # The token mean is subtracted, so a per-channel offset changes (almost) nothing.
    assert (plain.k.int() - shifted.k.int()).abs().max() <= 1
    torch.testing.assert_close(plain.k_scale, shifted.k_scale, rtol=1e-4, atol=0)
    absmax = q[:, :32].abs().amax(dim=(1, 3))
    torch.testing.assert_close(plain.q_scale[:, :, 0], absmax / 127 * 0.1 * math.log2(math.e))
    assert plain.v is v and plain.v_scale is None

    if FP8_DTYPE is None:
        pytest.skip("this torch build has no float8_e4m3fn")
    v8, v_scale = quantize_fp8_channels(v)
    assert v8.dtype == FP8_DTYPE and v8.shape == v.shape and v8.stride(1) == 1  # sequence-contiguous
    torch.testing.assert_close(v_scale, v.abs().amax(dim=1) / 448)
    dequantized = v8.float() * v_scale[:, None]
    # e4m3 keeps 3 mantissa bits: rounding moves a normal value by at most 1/16 of it, and a
    # subnormal one (below 2^-6 before scaling) by at most half of 2^-9.
    bound = torch.maximum(v.abs() / 16, v_scale[:, None] * 2 ** -10) * (1 + 1e-6)
    assert bool(((dequantized - v).abs() <= bound).all())


def test_k_smoothing_leaves_attention_unchanged():
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 128, 2, 64, generator=gen) for _ in range(3))
    layout = BlockLayout.full(64, 64, 128, 128)
    # fp32 inputs: in fp16 the offset itself would round K by more than int8 does.
    shifted = k + 8 * torch.randn(1, 1, 2, 64, generator=gen)
    base = quantized_attention_reference(q, k, v, layout)
    out = quantized_attention_reference(q, shifted, v, layout)
    torch.testing.assert_close(out, base, atol=2e-3, rtol=0)
    # Unsmoothed, the offset would set K's int8 step (~8x coarser) and cost far more than this.
    exact = block_sparse_attention_reference(q, shifted, v, layout)
    assert F.cosine_similarity(out.double().flatten(), exact.double().flatten(), dim=0) >= 0.9995


# -- simulated reference ------------------------------------------------------------------------

def accuracy(out, exact):
    o, e = out.double().flatten(), exact.double().flatten()
    return F.cosine_similarity(o, e, dim=0).item(), ((o - e).abs().sum() / e.abs().sum()).item()


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("pv", ["input", "fp8"])
def test_reference_accuracy_against_fp32_attention_on_random_inputs(head_dim, pv):
    """Measured (S=1024, fp16): input PV cos 0.9999, rel L1 1.3%; FP8 PV cos 0.9993, rel L1 ~3.8%."""
    if pv == "fp8" and FP8_DTYPE is None:
        pytest.skip("this torch build has no float8_e4m3fn")
    gen = torch.Generator().manual_seed(head_dim)
    q, k, v = (torch.randn(1, 1024, 2, head_dim, generator=gen).half() for _ in range(3))
    layout = BlockLayout.full(128, 128, 1024, 1024)
    exact = block_sparse_attention_reference(q.float(), k.float(), v.float(), layout)
    cosine, rel_l1 = accuracy(quantized_attention_reference(q, k, v, layout, pv=pv), exact)
    assert cosine >= 0.999
    # FP8 P and V cost ~2.5% each on random data; the 3% target holds for INT8 QK with 16-bit PV.
    assert rel_l1 <= (0.03 if pv == "input" else 0.045), rel_l1


def test_reference_on_sparse_layouts_zeroes_empty_rows_and_slices_exactly():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 200, 2, 64, generator=gen) for _ in range(3))
    mask = torch.rand(2, 2, 4, 4, generator=gen) < 0.6
    mask[0, 1, 2] = False
    mask[..., 3, 3] = True
    layout = BlockLayout.from_dense_mask(mask, 64, 64, 200, 200)
    out = quantized_attention_reference(q, k, v, layout)
    assert out[0, 128:192, 1].abs().max() == 0
    exact = block_sparse_attention_reference(q, k, v, layout)
    assert accuracy(out, exact)[0] >= 0.999
    # The benchmark spot-checks query-block slices: they must give exactly the full call's rows.
    part = layout.query_block_slice(3, 4)
    torch.testing.assert_close(quantized_attention_reference(q[:, 192:], k, v, part), out[:, 192:], atol=0, rtol=0)


def test_pv_modes_devices_and_dispatch_on_cpu():
    assert resolve_pv("auto", torch.device("cpu")) == "input"
    with pytest.raises(ValueError, match="pv"):
        resolve_pv("int4", torch.device("cpu"))
    q = torch.randn(1, 8, 1, 16)
    assert "head_dim 16" in quant_triton_supported(q)[1]
    if quant_triton_supported(torch.randn(1, 8, 1, 64))[0]:
        pytest.skip("this process runs Triton's interpreter")
    assert "TRITON_INTERPRET" in quant_triton_supported(torch.randn(1, 8, 1, 64))[1]
    with pytest.raises(ValueError, match="backend"):
        quantized_block_sparse_attention(q, q, q, BlockLayout.full(16, 16, 8, 8), backend="flex")
    # auto on CPU is the simulated reference
    layout = BlockLayout.full(32, 32, 8, 8)
    torch.testing.assert_close(quantized_block_sparse_attention(q, q, q, layout),
                               quantized_attention_reference(q, q, q, layout), atol=0, rtol=0)
