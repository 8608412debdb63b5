"""The memory-bound operators (merge_attention, zigzag_permute/unpermute, varlen_index) on the `cpu`
backend (and `cuda` under the `gpu` marker) against the `reference` backend.

Outputs the kernels allocate are poisoned (NaN / max-int fill of fresh memory) so an element a kernel
forgets to write fails the comparison. Not covered here: nvcc compilation of csrc/cuda, which
`make cuda-check` (scripts/check_cuda.sh) does.
"""
import pytest
import torch

from longvila_engine import ops

INF = float("-inf")


@pytest.fixture
def poisoned():
    """Make torch.empty fill new memory (NaN for floats, the max value for ints) while active."""
    det, fill = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(det)
    torch.utils.deterministic.fill_uninitialized_memory = fill


def _merge_inputs(shape, acc, block_dtype, seed, device="cpu"):
    """Running (out, lse) and a block with some rows empty on one side and some on both sides.

    Empty rows carry lse=-inf and out=0, as every attention backend leaves them."""
    g = torch.Generator().manual_seed(seed)
    B, S, H, D = shape
    lse = torch.randn(B, H, S, generator=g, dtype=torch.float64) * 3
    lse_b = torch.randn(B, H, S, generator=g, dtype=torch.float64) * 3
    pick = torch.randint(0, 4, (B, H, S), generator=g)
    lse[pick == 1] = INF  # running result empty
    lse_b[pick == 2] = INF  # block empty
    lse[pick == 3] = INF  # both empty
    lse_b[pick == 3] = INF
    out = torch.randn(shape, generator=g, dtype=torch.float64)
    out_b = torch.randn(shape, generator=g, dtype=torch.float64)
    out = out * torch.isfinite(lse).transpose(1, 2).unsqueeze(-1)
    out_b = out_b * torch.isfinite(lse_b).transpose(1, 2).unsqueeze(-1)
    to = dict(device=device)
    return (out.to(acc).to(**to), lse.to(acc).to(**to), out_b.to(block_dtype).to(**to),
            lse_b.to(acc).to(**to), pick.to(device))


def _merge_both(shape, acc, block_dtype, seed, backend):
    out, lse, out_b, lse_b, pick = _merge_inputs(shape, acc, block_dtype, seed)
    ref_out, ref_lse = ops.merge_attention(out.clone(), lse.clone(), out_b, lse_b, backend="reference")
    got_out, got_lse = ops.merge_attention(out, lse, out_b, lse_b, backend=backend)
    assert got_out.data_ptr() == out.data_ptr() and got_lse.data_ptr() == lse.data_ptr(), "must merge in place"
    return got_out, got_lse, ref_out, ref_lse, pick


SHAPES = [(2, 5, 3, 7), (1, 1, 1, 1), (1, 17, 2, 64), (3, 4, 2, 0), (1, 0, 2, 8)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    "acc,block_dtype,tol",
    [
        (torch.float64, torch.float64, 1e-12),
        (torch.float64, torch.bfloat16, 1e-12),
        (torch.float32, torch.float32, 1e-5),
        (torch.float32, torch.bfloat16, 1e-5),
        (torch.float32, torch.float16, 1e-5),
        (torch.float32, torch.float64, 1e-5),
    ],
)
def test_merge_matches_reference(shape, acc, block_dtype, tol):
    out, lse, ref_out, ref_lse, pick = _merge_both(shape, acc, block_dtype, seed=sum(shape), backend="cpu")
    torch.testing.assert_close(lse, ref_lse, rtol=tol, atol=tol)
    torch.testing.assert_close(out, ref_out, rtol=tol, atol=tol)
    assert not out.isnan().any() and not lse.isnan().any()
    both_empty = pick == 3
    assert (lse[both_empty] == INF).all(), "two empty rows stay empty"
    assert (out.transpose(1, 2)[both_empty] == 0).all(), "an empty row has out = 0"
    one_empty = (pick == 1) | (pick == 2)
    assert torch.isfinite(lse[one_empty]).all()


def test_merge_one_empty_side_is_exact():
    """With one side at lse=-inf the other side's weight is exactly 1: out and lse are copied bit for bit."""
    out, lse, out_b, lse_b, _ = _merge_inputs((2, 6, 3, 5), torch.float32, torch.float32, seed=3)
    lse.fill_(INF)
    out.zero_()
    ops.merge_attention(out, lse, out_b, lse_b, backend="cpu")
    assert torch.equal(out, out_b) and torch.equal(lse, lse_b)


def test_merge_far_apart_lse_does_not_overflow():
    out = torch.ones(1, 3, 1, 4)
    lse = torch.tensor([[[1000.0, -1000.0, 80.0]]])
    out_b = torch.full((1, 3, 1, 4), 2.0)
    lse_b = torch.tensor([[[-1000.0, 1000.0, 80.0]]])
    ref = ops.merge_attention(out.clone(), lse.clone(), out_b, lse_b, backend="reference")
    got = ops.merge_attention(out, lse, out_b, lse_b, backend="cpu")
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([1.0, 2.0, 1.5]))
    torch.testing.assert_close(lse[0, 0, 2], torch.tensor(80.0 + 0.6931471805599453))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_merge_widens_every_16_bit_pattern_exactly(dtype):
    """The 16-bit -> float widening in lv_math.h (shared with the CUDA kernel) over all 65536 patterns,
    subnormals, infinities and NaNs included."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    out_b = bits.view(dtype).reshape(1, 256, 1, 256)
    out = torch.zeros(1, 256, 1, 256)
    lse = torch.full((1, 1, 256), INF)
    ops.merge_attention(out, lse, out_b, torch.zeros(1, 1, 256), backend="cpu")
    torch.testing.assert_close(out, out_b.float(), rtol=0, atol=0, equal_nan=True)


def test_merge_rejects_bad_input():
    out, lse, out_b, lse_b, _ = _merge_inputs((1, 4, 2, 8), torch.float32, torch.float32, seed=1)
    with pytest.raises(ValueError, match="out_block shape"):
        ops.merge_attention(out, lse, out_b[:, :3], lse_b, backend="cpu")
    with pytest.raises(ValueError, match="float32"):
        ops.merge_attention(out.half(), lse.half(), out_b, lse_b, backend="cpu")
    with pytest.raises(ValueError, match=r"\(B, H, S\)"):
        ops.merge_attention(out, lse.transpose(1, 2), out_b, lse_b, backend="cpu")
    # The operator itself (what torch.compile'd or direct callers reach) checks with TORCH_CHECK.
    op = torch.ops.longvila_engine.merge_attn
    with pytest.raises(RuntimeError, match="contiguous"):
        op(out, lse, out_b.transpose(1, 2).contiguous().transpose(1, 2), lse_b)
    with pytest.raises(RuntimeError, match="dtype"):
        op(out, lse, out_b, lse_b.double())
    with pytest.raises(RuntimeError, match="out_block must be float16"):
        op(out, lse, out_b.int(), lse_b)


ZIGZAG_CASES = [
    # shape, dim, ring_size
    ((3, 12, 2, 5), 1, 1),
    ((3, 12, 2, 5), 1, 2),
    ((3, 12, 2, 5), 1, 3),
    ((8, 3), 0, 2),
    ((8, 3), 0, 4),
    ((2, 3, 16), -1, 4),
    ((2, 3, 16), 2, 8),
    ((1, 40, 1, 1), 1, 5),
    ((2, 0, 3), 1, 2),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int8, torch.bool,
          torch.complex64]


def _random(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return torch.randint(-100, 100, shape, generator=g).to(dtype)


@pytest.mark.parametrize("shape,dim,ring_size", ZIGZAG_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_zigzag_matches_reference_and_round_trips(shape, dim, ring_size, dtype, poisoned):
    x = _random(shape, dtype, seed=len(shape) + ring_size)
    fwd = ops.zigzag_permute(x, ring_size, dim=dim, backend="cpu")
    assert torch.equal(fwd, ops.zigzag_permute(x, ring_size, dim=dim, backend="reference"))
    back = ops.zigzag_unpermute(fwd, ring_size, dim=dim, backend="cpu")
    assert torch.equal(back, ops.zigzag_unpermute(fwd, ring_size, dim=dim, backend="reference"))
    assert torch.equal(back, x)


def test_zigzag_layout_gives_each_rank_its_chunk_pair():
    ring_size = 3
    x = torch.arange(12).reshape(1, 12)
    local = ops.zigzag_permute(x, ring_size, dim=1, backend="cpu").chunk(ring_size, dim=1)
    for r in range(ring_size):
        assert local[r].flatten().tolist() == [2 * r, 2 * r + 1, 10 - 2 * r, 11 - 2 * r]


def test_zigzag_of_a_non_contiguous_view():
    x = torch.randn(6, 8, 5).transpose(0, 1)  # (8, 6, 5), not contiguous
    torch.testing.assert_close(ops.zigzag_permute(x, 2, dim=0, backend="cpu"),
                               ops.zigzag_permute(x, 2, dim=0, backend="reference"), rtol=0, atol=0)


def test_zigzag_rejects_bad_input():
    x = torch.randn(2, 10, 3)
    with pytest.raises(ValueError, match="divisible by 2\\*ring_size=4"):
        ops.zigzag_permute(x, 2, dim=1, backend="cpu")
    with pytest.raises(ValueError, match="ring_size"):
        ops.zigzag_permute(x, 0, dim=1, backend="cpu")
    op = torch.ops.longvila_engine.zigzag_permute
    with pytest.raises(RuntimeError, match="divisible"):
        op(x, 2, 1, False)
    with pytest.raises(RuntimeError, match="out of range"):
        op(x, 1, 3, False)
    with pytest.raises(RuntimeError, match="contiguous"):
        op(x.transpose(0, 2), 1, 1, False)


VARLEN_CASES = [
    ([0, 3, 3, 7, 8, 8, 12], 12),  # empty sequences in the middle and at the end
    ([0, 0, 0, 5], 5),  # empty sequences first
    ([0, 5], 5),
    ([0, 5, 9], 7),  # only the first `total` packed tokens
    ([0, 0, 0], 0),
    ([0], 0),
]


@pytest.mark.parametrize("cu,total", VARLEN_CASES)
def test_varlen_index_matches_reference(cu, total, poisoned):
    cu_seqlens = torch.tensor(cu, dtype=torch.int32)
    seq_id, position = ops.varlen_index(cu_seqlens, total, backend="cpu")
    ref_seq, ref_pos = ops.varlen_index(cu_seqlens, total, backend="reference")
    assert seq_id.dtype == position.dtype == torch.int32
    assert torch.equal(seq_id, ref_seq) and torch.equal(position, ref_pos)


def test_varlen_index_many_sequences(poisoned):
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(0, 5, (3000,), generator=g)
    lengths[::7] = 0
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(torch.int32)
    total = int(cu_seqlens[-1])
    got = ops.varlen_index(cu_seqlens, total, backend="cpu")
    ref = ops.varlen_index(cu_seqlens, total, backend="reference")
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_varlen_index_rejects_bad_input():
    with pytest.raises(ValueError, match="int32"):
        ops.varlen_index(torch.tensor([0, 3]), 3, backend="cpu")
    op = torch.ops.longvila_engine.varlen_index
    with pytest.raises(RuntimeError, match="must not decrease"):
        op(torch.tensor([0, 4, 2], dtype=torch.int32), 2)
    with pytest.raises(RuntimeError, match="start at 0"):
        op(torch.tensor([1, 4], dtype=torch.int32), 3)
    with pytest.raises(RuntimeError, match="exceeds"):
        op(torch.tensor([0, 4], dtype=torch.int32), 5)
    with pytest.raises(RuntimeError, match="total must be"):
        op(torch.tensor([0, 4], dtype=torch.int32), -1)


def test_large_inputs_take_the_threaded_paths(poisoned):
    """Sizes past the OpenMP thresholds, and zigzag chunks long enough to be copied in several pieces."""
    out, lse, out_b, lse_b, _ = _merge_inputs((1, 512, 8, 64), torch.float32, torch.bfloat16, seed=5)
    ref = ops.merge_attention(out.clone(), lse.clone(), out_b, lse_b, backend="reference")
    torch.testing.assert_close(ops.merge_attention(out, lse, out_b, lse_b, backend="cpu"), ref)
    for shape, ring_size in (((1, 8192, 16, 8), 1), ((3, 4096, 4, 8), 2)):
        x = torch.randn(shape)
        fwd = ops.zigzag_permute(x, ring_size, dim=1, backend="cpu")
        assert torch.equal(fwd, ops.zigzag_permute(x, ring_size, dim=1, backend="reference"))
        assert torch.equal(ops.zigzag_unpermute(fwd, ring_size, dim=1, backend="cpu"), x)
    lengths = torch.randint(0, 50, (4000,), generator=torch.Generator().manual_seed(1))
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(torch.int32)
    total = int(cu_seqlens[-1])
    got = ops.varlen_index(cu_seqlens, total, backend="cpu")
    ref = ops.varlen_index(cu_seqlens, total, backend="reference")
    assert total > 2**15 and torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


@pytest.mark.gpu
def test_cuda_backend_matches_reference():
    """backend='cuda' on CUDA tensors against the reference; varlen_index under sync-debug 'error' to
    prove it never synchronises with the host."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from longvila_engine._extension import cuda_kernels_available

    if not cuda_kernels_available():
        pytest.skip("the extension was built without CUDA kernels (needs a CUDA torch and CUDA_HOME at build)")
    dev = "cuda"
    for acc, block_dtype, tol in [(torch.float64, torch.float64, 1e-12), (torch.float32, torch.float32, 1e-5),
                                  (torch.float32, torch.bfloat16, 1e-5), (torch.float32, torch.float16, 1e-5),
                                  (torch.float64, torch.bfloat16, 1e-12)]:
        for shape in [(2, 5, 3, 7), (1, 300, 4, 128), (1, 1, 1, 1), (2, 3, 2, 0)]:
            out, lse, out_b, lse_b, pick = _merge_inputs(shape, acc, block_dtype, seed=7, device=dev)
            ref = ops.merge_attention(out.clone(), lse.clone(), out_b, lse_b, backend="reference")
            ops.merge_attention(out, lse, out_b, lse_b, backend="cuda")
            torch.testing.assert_close((out, lse), ref, rtol=tol, atol=tol)
            assert (lse[pick == 3] == INF).all() and not out.isnan().any()
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32, device=dev).to(torch.int16)
    for dtype in (torch.float16, torch.bfloat16):
        out = torch.zeros(1, 256, 1, 256, device=dev)
        lse = torch.full((1, 1, 256), INF, device=dev)
        out_b = bits.view(dtype).reshape(1, 256, 1, 256)
        ops.merge_attention(out, lse, out_b, torch.zeros(1, 1, 256, device=dev), backend="cuda")
        torch.testing.assert_close(out, out_b.float(), rtol=0, atol=0, equal_nan=True)

    # Shapes chosen so that every copy width (16, 8, 4, 2, 1 bytes) and a misaligned start are taken.
    for shape, dim, ring_size in ZIGZAG_CASES + [((2, 64, 4), 1, 4), ((2, 64, 3), 1, 4), ((5, 4096, 8, 16), 1, 2)]:
        for dtype in DTYPES:
            x = _random(shape, dtype, seed=1).to(dev)
            for inverse in (False, True):
                fn = ops.zigzag_unpermute if inverse else ops.zigzag_permute
                assert torch.equal(fn(x, ring_size, dim=dim, backend="cuda"),
                                   fn(x, ring_size, dim=dim, backend="reference"))
    storage = torch.arange(1 + 8 * 6, dtype=torch.float32, device=dev)
    x = storage[1:].view(8, 6)  # one element into its storage: not 16-byte aligned
    assert torch.equal(ops.zigzag_permute(x, 2, dim=0, backend="cuda"),
                       ops.zigzag_permute(x, 2, dim=0, backend="reference"))

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(0, 40, (5000,), generator=g)
    lengths[::3] = 0
    cu_all = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(torch.int32)
    for cu, total in VARLEN_CASES + [(cu_all.tolist(), int(cu_all[-1]))]:
        cu_seqlens = torch.tensor(cu, dtype=torch.int32, device=dev)
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = ops.varlen_index(cu_seqlens, total, backend="cuda")
        finally:
            torch.cuda.set_sync_debug_mode("default")
        ref = ops.varlen_index(cu_seqlens, total, backend="reference")
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
