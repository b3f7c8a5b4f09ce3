"""QDECLinear: forward against the reference, selection policies, the dense
evaluation path against the op path, state_dict round trip, repr."""

from __future__ import annotations

import pytest
import torch
from conftest import cpu_decode_atol, make_layer

from qdec import reference as ref
from qdec.nn import QDECLinear


def build(k=0, policy="dynamic", bias=True, N=40, K=96, symmetric=False) -> QDECLinear:
    layer = make_layer(N, K, 3, 32, symmetric=symmetric)
    return QDECLinear(layer.qweight, layer.scales, layer.zeros, 3, 32, K, layer.residual,
                      layer.residual_scales, 4, torch.randn(N) if bias else None, k, policy)


def assert_op_path_close(got, want, x, sides=1):
    """got ~ want where `sides` of them ran the CPU GEMV, which rounds x to
    int16 per span: each side is within the derived bound (conftest.
    cpu_decode_atol, csrc/include/qdec/cpu_decode.h) of the float result.
    The layers here are build()'s weights (make_layer(40, 96, 3, 32), seed 0)."""
    atol = sides * cpu_decode_atol(x, make_layer(40, 96, 3, 32)).reshape(got.shape)
    assert bool(((got - want).abs() <= atol + 1e-5 * want.abs()).all())


def test_forward_matches_reference_and_bias():
    m = build(k=5)
    x = torch.randn(2, 7, 96)
    want = ref.compensated_linear_ref(x, m.qweight, m.scales, m.zeros, 3, 32, m.residual,
                                      m.residual_scales, 4, 5) + m.bias
    # The CPU GEMV rounds x to int16 per span: held to its derived bound
    # (conftest.cpu_decode_atol, csrc/include/qdec/cpu_decode.h), not 1e-5.
    same_weights = make_layer(40, 96, 3, 32)  # what build() packed (same seed)
    atol = cpu_decode_atol(x, same_weights).reshape(2, 7, 40)
    assert bool(((m(x) - want).abs() <= atol + 1e-5 * want.abs()).all())


def test_k_as_fraction_and_bounds():
    m = build()
    m.k = 0.1
    assert m.k == 10  # round(0.1 * 96)
    m.k = 96
    assert m.k == 96
    with pytest.raises(ValueError, match=r"k must be in \[0, in_features=96\], got 97"):
        m.k = 97
    with pytest.raises(ValueError, match="fraction must be in"):
        m.k = 1.5
    with pytest.raises(ValueError, match="policy must be one of"):
        m.policy = "best"


def test_prefill_compensation_can_be_disabled():
    m = build(k=8)
    x = torch.randn(5, 96)
    m.compensate_prefill = False
    base = build(k=0)
    base.load_state_dict(m.state_dict())
    base.k = 0
    torch.testing.assert_close(m(x), base(x))
    # a single-token step is still compensated
    assert not torch.allclose(m(x[:1]), base(x[:1]))


@pytest.mark.parametrize("policy", ["dynamic", "static", "random", "oracle"])
def test_dense_simulation_equals_op_path(policy):
    m = build(k=12, policy=policy)
    m.set_static_channels(torch.arange(95, -1, -1))
    x = torch.randn(33, 96)
    m.reset_rng()
    y_ops = m(x)
    m.simulate_dense = True
    m.reset_rng()  # the random policy must see the same draws on both paths
    assert_op_path_close(y_ops, m(x), x)


def test_selection_shards_select_locally_per_slice():
    """selection_shards = s: each of s contiguous input slices takes its own top
    ceil(k/s) |x| (a row-parallel rank under tensor parallelism), on the op path
    and the dense simulation alike; s = 1 is the global top-k."""
    m = build(k=5, bias=False)
    x = torch.randn(4, 96)
    x[:, :48] *= 10  # every global outlier sits in the first half
    m.selection_shards = 2
    assert m.channels_per_token == 6  # 2 * ceil(5 / 2)
    ch = m.select_channels(x)
    assert ch.shape == (4, 6)
    for row, xr in zip(ch, x):
        for i, half in enumerate((row[:3], row[3:])):
            lo = i * 48
            want = xr[lo:lo + 48].abs().topk(3).indices + lo
            assert sorted(half.tolist()) == sorted(want.tolist())
    want = ref.compensated_linear_ref(x, m.qweight, m.scales, m.zeros, 3, 32, m.residual,
                                      m.residual_scales, 4, 6, ch)
    # Op path: the CPU GEMV's int16 bound (see test_forward_matches_reference_and_bias).
    atol = cpu_decode_atol(x, make_layer(40, 96, 3, 32))
    assert bool(((m(x) - want).abs() <= atol + 1e-5 * want.abs()).all())
    m.simulate_dense = True
    torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-5)
    assert m.fetched_bytes_per_token == 6 * m.residual.shape[1] * 4
    with pytest.raises(ValueError, match="divide in_features=96"):
        m.selection_shards = 5
    m.policy = "static"
    with pytest.raises(ValueError, match="dynamic policy only"):
        m.select_channels(x)


def test_policies_pick_expected_channels():
    m = build(k=4, policy="static")
    m.set_static_channels(torch.tensor([5, 9, 1, 3, 7]))
    x = torch.randn(3, 96)
    assert m.select_channels(x).tolist() == [[5, 9, 1, 3]] * 3
    m.policy = "oracle"
    score = x.abs() * m._col_norms()
    assert torch.equal(m.select_channels(x), ref.outlier_select_ref(score, 4))
    m.policy = "random"
    a, b = m.select_channels(x), m.select_channels(x)
    assert a.shape == (3, 4) and not torch.equal(a, b)  # a fresh draw per call
    m.reset_rng()
    assert torch.equal(m.select_channels(x), a)  # reproducible from the seed


def test_state_dict_round_trip():
    m = build(k=7, symmetric=True)
    sd = m.state_dict()
    assert {"qweight", "scales", "bias", "residual", "residual_scales", "k"} <= set(sd)
    m2 = build(k=0, bias=True)  # different content, same shapes
    m2.zeros = None
    m2.load_state_dict(sd)
    x = torch.randn(4, 96)
    assert m2.k == 7
    torch.testing.assert_close(m2(x), m(x), rtol=0, atol=0)


def test_repr_shows_format():
    r = repr(build(k=3))
    for part in ("bits=3", "group_size=32", "k=3", "residual_bits=4", "policy=dynamic"):
        assert part in r


# ----------------------------------------------------------- input permutation
def test_input_permutation_gathers_input_before_everything():
    """Act-order layers: the packed columns and residual rows are in permuted
    order, so the layer must equal the unpermuted layer applied to x[perm]."""
    m = build(k=7, bias=False)
    perm = torch.randperm(96, generator=torch.Generator().manual_seed(3))
    permuted = build(k=7, bias=False)
    permuted.load_state_dict(m.state_dict())
    permuted.set_input_permutation(perm)
    x = torch.randn(4, 96)
    torch.testing.assert_close(permuted(x), m(x[:, perm]))
    permuted.simulate_dense = True
    assert_op_path_close(permuted(x), m(x[:, perm]), x, sides=2)
    assert "input_permutation" in repr(permuted)
    again = build(k=7, bias=False)
    again.load_state_dict(permuted.state_dict())
    assert torch.equal(again.input_permutation, perm)
    with pytest.raises(ValueError, match=r"permutation of range\(96\)"):
        m.set_input_permutation(torch.zeros(96, dtype=torch.int64))


# --------------------------------------------------------------------- hybrid
def hybrid_parts(N=40, K=96, r=6):
    """A layer, a rank-r term and the residual store of what it leaves."""
    from qdec.lowrank import LowRankTerm, residual_after_lowrank
    from qdec.quant.residual import quantize_residual

    m = build(k=9, bias=False, N=N, K=K)
    w_hat = ref.dequantize_ref(m.qweight, m.scales, m.zeros, 3, 32, K)
    g = torch.Generator().manual_seed(5)
    w_ref = w_hat + 0.05 * torch.randn(N, K, generator=g)
    E = w_ref - w_hat
    U, S, Vh = torch.linalg.svd(E.double())
    L_A, L_B = (U[:, :r] * S[:r]).float(), Vh[:r].float()
    packed, scales = quantize_residual(residual_after_lowrank(E, L_A, L_B), bits=8)
    return m, LowRankTerm(L_A, L_B), packed, scales, w_ref


def test_hybrid_adds_lowrank_term_and_uses_remainder_store():
    m, term, packed, scales, w_ref = hybrid_parts()
    x = torch.randn(5, 96)
    want = (ref.compensated_linear_ref(x, m.qweight, m.scales, m.zeros, 3, 32, packed, scales, 8, 9)
            + (x @ term.lowrank_b.t()) @ term.lowrank_a.t())
    m.residual_bits = 8
    m.set_lowrank(term, packed, scales)
    assert_op_path_close(m(x), want, x)
    m.simulate_dense = True
    torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-5)
    # k = K with an 8-bit remainder store recovers W_ref up to the store's rounding
    m.k = 96
    torch.testing.assert_close(m(x), x @ w_ref.t(), rtol=0, atol=2e-2)


def test_hybrid_costs_and_state_dict():
    m, term, packed, scales, _ = hybrid_parts()
    m.residual_bits = 8
    base_gpu = m.gpu_extra_bytes
    assert base_gpu == 40 * 4  # fp32 residual scales, needed while k > 0
    m.set_lowrank(term, packed, scales)
    assert m.gpu_extra_bytes == base_gpu + 6 * (40 + 96) * 4
    assert m.fetched_bytes_per_token == 9 * packed.shape[1] * 4  # k rows of the store
    m.k = 0
    assert m.fetched_bytes_per_token == 0
    assert m.gpu_extra_bytes == 6 * (40 + 96) * 4
    m.k = 9
    fresh = build(k=0, bias=False)
    fresh.residual_bits = 8
    fresh.load_state_dict(m.state_dict())
    assert fresh.lowrank is not None and fresh.lowrank.rank == 6 and fresh.k == 9
    x = torch.randn(2, 96)
    torch.testing.assert_close(fresh(x), m(x))
    with pytest.raises(ValueError, match=r"low-rank term is \[40, 50\]"):
        from qdec.lowrank import LowRankTerm
        m.set_lowrank(LowRankTerm(torch.zeros(40, 2), torch.zeros(2, 50)))
