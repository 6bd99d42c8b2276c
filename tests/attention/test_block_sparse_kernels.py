"""Block-sparse attention: layout, torch reference, FlexAttention and Triton paths.

The Triton kernel is checked on CPU through Triton's interpreter in a child
process: Triton decides compiler vs interpreter when `import triton` decorates
its own standard library, so TRITON_INTERPRET=1 must be set before Triton's
first import, which this pytest process cannot promise (any earlier test or
torch.compile may have imported it). On a CUDA machine the same cases also run
through the compiled kernel in-process.

bf16 is not checked in the interpreter: its tl.dot on bf16 operands returns
garbage there, so bf16 is covered on the reference/flex paths (and on CUDA).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import accel.attention.kernels as kernels
from accel.attention.kernels import (BlockLayout, block_sparse_attention, block_sparse_attention_flex,
                                     block_sparse_attention_reference, triton_supported)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# Outputs are convex combinations of N(0, 1) values, so absolute tolerances fit.
TOLERANCE = {"fp32": 2e-5, "fp16": 4e-3, "bf16": 2e-2}

# id: (batch, q_len, kv_len, heads, head_dim, block_q, block_k, dtype, layout kind, launch_config)
# layout kinds: "random" (per-batch, shared over heads, some empty query blocks),
# "random_per_head", "full", "tail_first" (ragged last key block listed first,
# so the first key tile a row sees is partly padding).
KERNEL_CASES = {
    "odd_sq_ne_sk_d64_fp16": (2, 77, 130, 2, 64, 16, 32, "fp16", "random", None),
    "odd_sk_gt_sq_d128_fp32": (1, 130, 77, 2, 128, 32, 16, "fp32", "random_per_head", None),
    "long_200_d64_fp32": (1, 200, 200, 1, 64, 32, 32, "fp32", "random", None),
    "full_200_d64_fp16": (1, 200, 200, 2, 64, 32, 32, "fp16", "full", None),
    "full_77x90_d128_fp32": (1, 77, 90, 1, 128, 16, 16, "fp32", "full", None),
    "sub_tiles_tail_first_fp32": (1, 50, 40, 1, 64, 32, 32, "fp32", "tail_first", {"BLOCK_M": 16, "BLOCK_N": 16}),
    "d16_block64_fp16": (1, 70, 70, 1, 16, 64, 64, "fp16", "random", None),
    "d256_fp32": (1, 40, 40, 1, 256, 16, 16, "fp32", "random", None),
}


def make_case(case_id: str, device="cpu", dtype_override=None):
    batch, q_len, kv_len, heads, head_dim, block_q, block_k, dtype_name, kind, launch = KERNEL_CASES[case_id]
    dtype = DTYPES[dtype_override or dtype_name]
    gen = torch.Generator().manual_seed(sum(map(ord, case_id)))
    q = torch.randn(batch, q_len, heads, head_dim, generator=gen)
    k = torch.randn(batch, kv_len, heads, head_dim, generator=gen)
    v = torch.randn(batch, kv_len, heads, head_dim, generator=gen)
    # Strided k/v: slice them out of a wider (B, S, H, 2D) buffer so the kernel
    # must honour strides instead of assuming contiguity.
    k = torch.cat([k, v], dim=-1)[..., :head_dim]
    q, k, v = (x.to(device=device, dtype=dtype) for x in (q, k, v))
    num_q, num_k = math.ceil(q_len / block_q), math.ceil(kv_len / block_k)
    if kind == "full":
        layout = BlockLayout.full(block_q, block_k, q_len, kv_len)
    elif kind == "tail_first":
        indices = torch.tensor([[[[num_k - 1, 0]] * num_q]], dtype=torch.int32)
        counts = torch.full((1, 1, num_q), 2, dtype=torch.int32)
        layout = BlockLayout(indices, counts, block_q, block_k, q_len, kv_len)
    else:
        mask = torch.rand(batch, heads if kind == "random_per_head" else 1, num_q, num_k, generator=gen) < 0.5
        mask[0, 0, 0] = False  # guarantees an empty query block
        mask[..., -1, -1] = True  # and the ragged corner tile is exercised
        layout = BlockLayout.from_dense_mask(mask, block_q, block_k, q_len, kv_len)
    return q, k, v, layout.to(device), launch


def kernel_case_errors(case_id: str, device="cpu", dtype_override=None) -> dict:
    q, k, v, layout, launch = make_case(case_id, device, dtype_override)
    out = kernels.block_sparse_attention_triton(q, k, v, layout, launch_config=launch)
    expected = block_sparse_attention_reference(q, k, v, layout)
    row_kept = layout.kv_counts.repeat_interleave(layout.block_q, dim=2)[..., : layout.q_len] > 0
    empty_rows = ~row_kept.expand(q.shape[0], q.shape[2], -1).transpose(1, 2)
    errors = {"vs_reference": (out.float() - expected.float()).abs().max().item(),
              "empty_rows_nonzero": out[empty_rows].abs().max().item() if empty_rows.any() else 0.0}
    if KERNEL_CASES[case_id][8] == "full":
        sdpa = F.scaled_dot_product_attention(*(x.transpose(1, 2).float() for x in (q, k, v))).transpose(1, 2)
        errors["vs_sdpa"] = (out.float() - sdpa).abs().max().item()
    return errors


@pytest.fixture(scope="module")
def interpreter_results(run_cases_in_interpreter):
    return run_cases_in_interpreter(__file__)


def _assert_case(case_id: str, errors: dict, dtype_name: str):
    assert "error" not in errors, errors.get("error")
    tol = TOLERANCE[dtype_name]
    assert errors["vs_reference"] <= tol, errors
    assert errors["empty_rows_nonzero"] == 0.0, errors
    if "vs_sdpa" in errors:
        assert errors["vs_sdpa"] <= tol, errors


@pytest.mark.parametrize("case_id", list(KERNEL_CASES))
def test_triton_interpreter_matches_reference(case_id, interpreter_results):
    _assert_case(case_id, interpreter_results[case_id], KERNEL_CASES[case_id][7])


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize("dtype_name", ["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("case_id", list(KERNEL_CASES))
def test_triton_cuda_matches_reference(case_id, dtype_name):
    _assert_case(case_id, kernel_case_errors(case_id, "cuda", dtype_name), dtype_name)


@needs_cuda
@pytest.mark.parametrize("case_id", ["odd_sq_ne_sk_d64_fp16", "full_200_d64_fp16", "odd_sk_gt_sq_d128_fp32"])
def test_flex_cuda_compiled_matches_reference(case_id):
    q, k, v, layout, _ = make_case(case_id, "cuda", "bf16")
    with torch.no_grad():
        out = block_sparse_attention_flex(q, k, v, layout, compile=True)
    expected = block_sparse_attention_reference(q, k, v, layout)
    assert (out.float() - expected.float()).abs().max().item() <= TOLERANCE["bf16"]


# ---------------------------------------------------------------- layout


def test_layout_round_trip_with_broadcast_dims():
    gen = torch.Generator().manual_seed(1)
    for shape in [(1, 1, 5, 7), (2, 3, 4, 4), (1, 2, 3, 9)]:
        mask = torch.rand(*shape, generator=gen) < 0.4
        mask[..., 0, :] = False  # an empty row must survive the round trip
        layout = BlockLayout.from_dense_mask(mask, 16, 32, shape[2] * 16 - 3, shape[3] * 32 - 5)
        assert torch.equal(layout.to_dense_mask(), mask)
        assert layout.kv_counts.tolist() == mask.sum(-1).tolist()


def test_layout_full_and_token_density():
    full = BlockLayout.full(32, 32, 77, 130)
    assert full.to_dense_mask().all() and full.density() == 1.0
    # Keep only the ragged corner: 13 query rows x 2 keys out of 77 x 130.
    mask = torch.zeros(1, 1, 3, 5, dtype=torch.bool)
    mask[0, 0, 2, 4] = True
    layout = BlockLayout.from_dense_mask(mask, 32, 32, 77, 130)
    assert layout.density() == pytest.approx(13 * 2 / (77 * 130))
    assert layout.to_token_mask().sum().item() == 13 * 2


def test_layout_query_block_slice():
    mask = torch.rand(1, 2, 4, 3, generator=torch.Generator().manual_seed(2)) < 0.5
    layout = BlockLayout.from_dense_mask(mask, 16, 16, 60, 40)
    tail = layout.query_block_slice(3, 4)
    assert tail.q_len == 60 - 48 and torch.equal(tail.to_dense_mask(), mask[:, :, 3:4])


def _layout_kwargs(**overrides):
    kwargs = dict(kv_indices=torch.zeros(1, 1, 2, 2, dtype=torch.int32), kv_counts=torch.ones(1, 1, 2, dtype=torch.int32),
                  block_q=16, block_k=16, q_len=20, kv_len=20)
    kwargs.update(overrides)
    return kwargs


@pytest.mark.parametrize("field, overrides", [
    ("block_q", {"block_q": 0}),
    ("kv_len", {"kv_len": 12.5}),
    ("kv_indices", {"kv_indices": torch.zeros(1, 1, 2, 2, dtype=torch.int64)}),
    ("kv_indices", {"kv_indices": torch.zeros(1, 2, 2, dtype=torch.int32)}),
    ("kv_counts", {"kv_counts": torch.ones(1, 1, 3, dtype=torch.int32)}),
    ("kv_counts", {"q_len": 40}),  # 3 query blocks needed, 2 given
    ("kv_counts", {"kv_counts": torch.full((1, 1, 2), 3, dtype=torch.int32)}),
    ("kv_indices", {"kv_indices": torch.full((1, 1, 2, 2), 2, dtype=torch.int32)}),  # only 2 key blocks
    ("kv_indices", {"kv_counts": torch.full((1, 1, 2), 2, dtype=torch.int32)}),  # block 0 listed twice
])
def test_layout_validation_names_the_field(field, overrides):
    with pytest.raises(ValueError, match=field):
        BlockLayout(**_layout_kwargs(**overrides))


def test_layout_padding_entries_are_not_validated():
    indices = torch.tensor([[[[1, 99], [0, -5]]]], dtype=torch.int32)
    layout = BlockLayout(**_layout_kwargs(kv_indices=indices))
    assert layout.to_dense_mask().tolist() == [[[[False, True], [True, False]]]]


def test_layout_rejects_mismatched_inputs():
    layout = BlockLayout.full(16, 16, 20, 20)
    q = torch.randn(1, 20, 2, 16)
    with pytest.raises(ValueError, match="q_len"):
        block_sparse_attention_reference(q, torch.randn(1, 21, 2, 16), torch.randn(1, 21, 2, 16), layout)
    per_batch = BlockLayout.from_dense_mask(torch.ones(3, 1, 2, 2, dtype=torch.bool), 16, 16, 20, 20)
    with pytest.raises(ValueError, match="broadcast"):
        block_sparse_attention_reference(q, q, q, per_batch)


# ---------------------------------------------------------------- reference and flex


@pytest.mark.parametrize("q_len, kv_len", [(77, 130), (130, 77)])
def test_reference_matches_sdpa_with_token_mask(q_len, kv_len):
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, n, 2, 32, generator=gen) for n in (q_len, kv_len, kv_len))
    mask = torch.rand(2, 2, math.ceil(q_len / 16), math.ceil(kv_len / 32), generator=gen) < 0.5
    mask[..., 0] = True  # SDPA gives NaN on empty rows; those are tested separately
    layout = BlockLayout.from_dense_mask(mask, 16, 32, q_len, kv_len)
    token_mask = mask.repeat_interleave(16, 2)[:, :, :q_len].repeat_interleave(32, 3)[..., :kv_len]
    expected = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), attn_mask=token_mask)
    out = block_sparse_attention_reference(q, k, v, layout)
    assert torch.allclose(out, expected.transpose(1, 2), atol=1e-5)


def test_reference_empty_rows_are_zero_and_scale_is_used():
    q, k, v = (torch.randn(1, 40, 1, 16) for _ in range(3))
    mask = torch.tensor([[[[True, True], [False, False], [True, False]]]])
    layout = BlockLayout.from_dense_mask(mask, 16, 32, 40, 40)
    out = block_sparse_attention_reference(q, k, v, layout, scale=0.5)
    assert torch.equal(out[:, 16:32], torch.zeros_like(out[:, 16:32]))
    expected = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q[:, :16], k, v)), scale=0.5)
    assert torch.allclose(out[:, :16], expected.transpose(1, 2), atol=1e-5)


@pytest.mark.parametrize("case_id, dtype_name", [
    ("odd_sq_ne_sk_d64_fp16", "fp32"), ("odd_sq_ne_sk_d64_fp16", "bf16"),
    ("odd_sk_gt_sq_d128_fp32", "fp32"), ("sub_tiles_tail_first_fp32", "bf16"),
])
def test_flex_eager_matches_reference(case_id, dtype_name):
    q, k, v, layout, _ = make_case(case_id, dtype_override=dtype_name)
    out = block_sparse_attention_flex(q, k, v, layout, compile=False)
    expected = block_sparse_attention_reference(q, k, v, layout)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert (out.float() - expected.float()).abs().max().item() <= TOLERANCE[dtype_name]


def test_flex_compiled_matches_reference():
    """One compiled case (CPU compile takes several seconds): the compiled kernel
    reads the block lists, unlike eager mode, so it needs its own check."""
    q, k, v, layout, _ = make_case("odd_sq_ne_sk_d64_fp16", dtype_override="fp32")
    with torch.no_grad():
        out = block_sparse_attention_flex(q, k, v, layout, compile=True)
    expected = block_sparse_attention_reference(q, k, v, layout)
    assert (out - expected).abs().max().item() <= TOLERANCE["fp32"]


# ---------------------------------------------------------------- dispatch and support checks


def test_triton_supported_reasons(monkeypatch):
    ok, reason = triton_supported(torch.zeros(1, 4, 1, 64, dtype=torch.int32))
    assert not ok and "dtype" in reason
    ok, reason = triton_supported(torch.zeros(1, 4, 1, 48))
    assert not ok and "head_dim" in reason
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ok, reason = triton_supported(torch.zeros(1, 4, 1, 64))
    assert not ok and "TRITON_INTERPRET" in reason
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        kernels.block_sparse_attention_triton(*(torch.zeros(1, 4, 1, 64),) * 3, BlockLayout.full(16, 16, 4, 4))


def test_dispatch_backends(monkeypatch):
    q, k, v, layout, _ = make_case("odd_sq_ne_sk_d64_fp16", dtype_override="fp32")
    expected = block_sparse_attention_reference(q, k, v, layout)
    assert torch.equal(block_sparse_attention(q, k, v, layout, backend="torch"), expected)
    calls = []
    monkeypatch.setattr(kernels, "block_sparse_attention_flex", lambda *args: calls.append(args) or expected)
    block_sparse_attention(q, k, v, layout)
    assert len(calls) == 1  # auto on CPU picks flex, never the Triton interpreter
    with pytest.raises(ValueError, match="backend"):
        block_sparse_attention(q, k, v, layout, backend="cuda")
