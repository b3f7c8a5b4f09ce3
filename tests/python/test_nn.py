"""QDECLinear: forward against the reference, selection policies, the dense
evaluation path against the op path, state_dict round trip, repr."""

from __future__ import annotations

import pytest
import torch
from conftest import make_layer

from qdec import reference as ref
from qdec.nn import QDECLinear


def build(k=0, policy="dynamic", bias=True, N=40, K=96, symmetric=False) -> QDECLinear:
    layer = make_layer(N, K, 3, 32, symmetric=symmetric)
    return QDECLinear(layer.qweight, layer.scales, layer.zeros, 3, 32, K, layer.residual,
                      layer.residual_scales, 4, torch.randn(N) if bias else None, k, policy)


def test_forward_matches_reference_and_bias():
    m = build(k=5)
    x = torch.randn(2, 7, 96)
    want = ref.compensated_linear_ref(x, m.qweight, m.scales, m.zeros, 3, 32, m.residual,
                                      m.residual_scales, 4, 5) + m.bias
    torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-5)


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
    torch.testing.assert_close(m(x), y_ops, rtol=1e-5, atol=1e-5)


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
