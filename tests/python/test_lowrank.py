"""Static low-rank compensators (qdec.lowrank): the closed forms against
brute-force computations on small random matrices."""

from __future__ import annotations

import pytest
import torch

import qdec.lowrank as lr
from qdec.lowrank import (ActivationStats, LowRankTerm, aser_outlier_channels,
                          expected_output_error, gpu_bytes, lowrank_compensator, rank_for_budget,
                          residual_after_lowrank, whitened_spectrum, zero_columns)


# ------------------------------------------------------------------ fixtures
def rtn_error(W: torch.Tensor, bits: int = 3) -> torch.Tensor:
    """``W - Q(W)`` for a per-row symmetric round-to-nearest: a realistic,
    full-rank, roughly white quantization error."""
    qmax = (1 << (bits - 1)) - 1
    scale = W.abs().amax(1, keepdim=True) / qmax
    return W - (W / scale).round().clamp(-qmax, qmax) * scale


def correlated_activations(n: int, K: int, seed: int, outliers: int = 3,
                           outlier_gain: float = 20.0) -> torch.Tensor:
    """float64 ``[n, K]`` tokens with correlated channels (a random mixing of
    Gaussian factors), a few persistent outlier channels (a large gain) and
    heavy-tailed per-token spikes on random channels, as in LLM activations."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, K, generator=g, dtype=torch.float64)
    mix = torch.eye(K, dtype=torch.float64) + 0.5 * torch.randn(K, K, generator=g,
                                                                dtype=torch.float64) / K ** 0.5
    x = z @ mix
    x[:, torch.randperm(K, generator=g)[:outliers]] *= outlier_gain
    spikes = torch.rand(n, K, generator=g, dtype=torch.float64) < 0.02
    return x + spikes * torch.randn(n, K, generator=g, dtype=torch.float64) * 8.0


def problem(N: int = 24, K: int = 32, n: int = 400, seed: int = 0, masked_topk: int = 0):
    g = torch.Generator().manual_seed(1000 + seed)
    W = torch.randn(N, K, generator=g, dtype=torch.float64) * 0.02
    E = rtn_error(W)
    X = correlated_activations(n, K, seed)
    stats = ActivationStats(K, masked_topk=masked_topk, matmul_dtype=torch.float64)
    for chunk in X.split(100):
        stats.add_batch(chunk)
    return W, E, X, stats


def output_error(E: torch.Tensor, L_A: torch.Tensor, L_B: torch.Tensor, X: torch.Tensor) -> float:
    """Brute force: ``sum_t ||(E - L_A L_B) x_t||^2 / n`` from the raw tokens."""
    D = E.double() - L_A.double() @ L_B.double()
    return float((X.double() @ D.t()).square().sum() / X.shape[0])


def damped_factor(stats: ActivationStats, damp: float, masked: bool = False) -> torch.Tensor:
    R = stats.masked_gram if masked else stats.gram
    Rd = R + damp * torch.diagonal(R).mean() * torch.eye(R.shape[0], dtype=R.dtype)
    return torch.linalg.cholesky(Rd)


# --------------------------------------------------------------- statistics
def test_stats_match_brute_force_and_chunking(monkeypatch):
    K, k = 7, 2
    X = correlated_activations(50, K, seed=3).float()
    monkeypatch.setattr(lr, "STATS_CHUNK_TOKENS", 8)  # several chunks per batch
    stats = ActivationStats(K, masked_topk=k, matmul_dtype=torch.float64)
    batches = [X[:20], X[20:21], X[21:]]
    for b in batches:
        stats.add_batch(b.reshape(1, -1, K) if b.shape[0] > 1 else b)
    Xd = X.double()
    assert stats.count == 50
    torch.testing.assert_close(stats.gram, Xd.t() @ Xd / 50)
    torch.testing.assert_close(stats.mean_square, Xd.square().mean(0))
    torch.testing.assert_close(stats.abs_mean, Xd.abs().mean(0))
    # L²QER: max over batches of the batch mean |x|, clamped, then normalised.
    s = torch.stack([b.double().abs().mean(0) for b in batches]).amax(0).clamp(min=1e-4)
    torch.testing.assert_close(stats.lqer_scale(), s / (s.min() * s.max()).sqrt())
    s_norm = stats.lqer_scale()
    torch.testing.assert_close(s_norm.min() * s_norm.max(), torch.tensor(1.0, dtype=torch.float64))


def test_masked_gram_matches_brute_force():
    """R' = mean_t x̄ x̄^T with x̄ = x with the token's own top-k |x| zeroed."""
    K, k, n = 6, 2, 10
    X = torch.randn(n, K, generator=torch.Generator().manual_seed(5))
    stats = ActivationStats(K, masked_topk=k)
    stats.add_batch(X[:4])
    stats.add_batch(X[4:])
    expected = torch.zeros(K, K, dtype=torch.float64)
    for t in range(n):
        x = X[t].double().clone()
        top = sorted(range(K), key=lambda j: -abs(float(X[t, j])))[:k]
        x[top] = 0.0  # the channels dynamic compensation covers
        expected += torch.outer(x, x)
    torch.testing.assert_close(stats.masked_gram, expected / n, rtol=1e-6, atol=1e-7)
    # The masked and the selected parts add up to the tokens: the masked Gram
    # never exceeds the full one on the diagonal.
    assert (torch.diagonal(stats.masked_gram) <= torch.diagonal(stats.gram) + 1e-12).all()


def test_attach_hook_accumulates_module_inputs():
    lin = torch.nn.Linear(5, 3)
    stats = ActivationStats(5)
    handle = stats.attach(lin)
    x = torch.randn(2, 4, 5)
    lin(x)
    handle.remove()
    lin(x)  # no longer recorded
    assert stats.count == 8
    xd = x.reshape(-1, 5).double()
    torch.testing.assert_close(stats.gram, xd.t() @ xd / 8, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------- closed forms
@pytest.mark.parametrize("damp", [1e-2, 0.0])
@pytest.mark.parametrize("rank", [0, 1, 4, 12])
def test_aser_error_is_singular_value_tail(rank, damp):
    """(a) The damped objective ||(E - L) S||_F^2 equals the tail of sigma(E S);
    with no damping that is the calibration output error itself."""
    _, E, X, stats = problem()
    L_A, L_B = lowrank_compensator(E, "aser", rank, stats, damp=damp, dtype=torch.float64)
    assert L_A.shape == (E.shape[0], rank) and L_B.shape == (rank, E.shape[1])
    sigma = whitened_spectrum(E, "aser", stats, damp=damp)
    tail = float(sigma[rank:].square().sum())
    S = damped_factor(stats, damp)
    D = E - L_A @ L_B
    assert float((D @ S).square().sum()) == pytest.approx(tail, rel=1e-9, abs=1e-15)
    if damp == 0.0:
        assert output_error(E, L_A, L_B, X) == pytest.approx(tail, rel=1e-9, abs=1e-15)
        assert expected_output_error(E, L_A, L_B, stats) == pytest.approx(tail, rel=1e-9)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("rank", [2, 8])
def test_method_ordering_on_correlated_activations(seed, rank):
    """(b) ASER (undamped) is the exact minimiser, so it beats LoRC and L²QER on
    every instance; on activations with outlier channels L²QER's diagonal
    scaling already beats the plain SVD."""
    _, E, X, stats = problem(seed=seed)
    errs = {m: output_error(E, *lowrank_compensator(E, m, rank, stats, damp=0.0,
                                                    dtype=torch.float64), X)
            for m in ("lorc", "lqer", "aser")}
    base = output_error(E, torch.zeros(E.shape[0], 0, dtype=torch.float64),
                        torch.zeros(0, E.shape[1], dtype=torch.float64), X)
    assert errs["aser"] <= errs["lqer"] * (1 + 1e-12)
    assert errs["aser"] <= errs["lorc"] * (1 + 1e-12)
    assert errs["lqer"] < errs["lorc"]
    assert errs["lorc"] < base
    # Damping changes the objective slightly; the damped fit stays close.
    damped = output_error(E, *lowrank_compensator(E, "aser", rank, stats, damp=1e-2,
                                                  dtype=torch.float64), X)
    assert damped <= errs["lqer"] and damped <= errs["aser"] * 1.05


@pytest.mark.parametrize("method", ["lorc", "lqer", "aser"])
@pytest.mark.parametrize("shape", [(12, 20), (20, 12)])
def test_full_rank_reconstructs_error(method, shape):
    """(c) rank = min(N, K) reproduces E for every whitening."""
    N, K = shape
    E = rtn_error(torch.randn(N, K, generator=torch.Generator().manual_seed(7)) * 0.02)
    stats = ActivationStats(K)
    stats.add_batch(correlated_activations(300, K, seed=1))
    L_A, L_B = lowrank_compensator(E, method, min(N, K), stats, dtype=torch.float64)
    torch.testing.assert_close(L_A @ L_B, E.double(), rtol=0, atol=1e-12)
    assert residual_after_lowrank(E, L_A, L_B).abs().max() < 1e-6
    L_A32, L_B32 = lowrank_compensator(E, method, min(N, K), stats)
    assert L_A32.dtype == torch.float32
    torch.testing.assert_close(L_A32 @ L_B32, E, rtol=0, atol=1e-6)


def test_lorc_is_plain_truncated_svd():
    E = torch.randn(10, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    L_A, L_B = lowrank_compensator(E, "lorc", 3, dtype=torch.float64)
    U, s, Vh = torch.linalg.svd(E, full_matrices=False)
    torch.testing.assert_close(L_A @ L_B, (U[:, :3] * s[:3]) @ Vh[:3])


def test_randomized_svd_is_near_exact():
    """The fast path loses little when the whitened spectrum decays."""
    _, E, X, stats = problem(N=64, K=96, n=800, seed=4)
    exact = output_error(E, *lowrank_compensator(E, "aser", 8, stats), X)
    fast = lowrank_compensator(E, "aser", 8, stats, svd="randomized")
    assert output_error(E, *fast, X) <= exact * 1.02
    again = lowrank_compensator(E, "aser", 8, stats, svd="randomized")
    torch.testing.assert_close(fast[0], again[0])  # reproducible


# ------------------------------------------------------------------ hybrid
def test_hybrid_error_is_masked_objective():
    """The hybrid y = W_hat x + L x + R_post[:, S_t] x[S_t] leaves exactly
    (E - L)(x ⊙ (1 - m_t)); the masked-Gram ASER fit minimises it, and its error
    is the tail of sigma(E S')."""
    k, rank = 4, 4
    W, E, X, stats = problem(N=16, K=24, n=600, seed=2, masked_topk=k)
    W_hat = W - E
    L_A, L_B = lowrank_compensator(E, "aser", rank, stats, damp=0.0, gram="masked",
                                   dtype=torch.float64)
    R_post = residual_after_lowrank(E, L_A, L_B)
    # Per-token simulation of the hybrid, selection by the runtime op.
    chans = lr.ops.outlier_select(X.float(), k)
    xs = torch.zeros_like(X).scatter_(1, chans, X.gather(1, chans))
    y = X @ W_hat.t() + X @ (L_A @ L_B).t() + xs @ R_post.t()
    hybrid_err = float((X @ W.t() - y).square().sum() / X.shape[0])
    assert hybrid_err == pytest.approx(expected_output_error(E, L_A, L_B, stats, gram="masked"),
                                       rel=1e-9)
    tail = float(whitened_spectrum(E, "aser", stats, damp=0.0, gram="masked")[rank:]
                 .square().sum())
    assert hybrid_err == pytest.approx(tail, rel=1e-9)
    # Fitting the low-rank term to the full Gram spends rank on error the
    # dynamic part removes anyway: worse for the hybrid.
    full = lowrank_compensator(E, "aser", rank, stats, damp=0.0, dtype=torch.float64)
    assert hybrid_err < expected_output_error(E, *full, stats, gram="masked")
    # And both beat dynamic compensation alone (R_post = E).
    dynamic_only = expected_output_error(E, None, None, stats, gram="masked")
    assert hybrid_err < dynamic_only


# ----------------------------------------------------------- ASER outliers
def test_aser_outlier_channels_and_zero_columns():
    W, _, X, stats = problem(seed=1)
    score = X.square().mean(0).sqrt() * W.norm(dim=0)
    expected = torch.argsort(score, descending=True)[:3]
    got = aser_outlier_channels(W, stats, 3)
    assert got.tolist() == expected.tolist()
    Wz = zero_columns(W, got)
    assert (Wz[:, got] == 0).all()
    keep = torch.ones(W.shape[1], dtype=torch.bool)
    keep[got] = False
    assert torch.equal(Wz[:, keep], W[:, keep]) and (W[:, got] != 0).any()
    assert aser_outlier_channels(W, stats, 0).numel() == 0
    with pytest.raises(ValueError, match="count"):
        aser_outlier_channels(W, stats, W.shape[1] + 1)


# ------------------------------------------------------ budget and runtime
def test_rank_for_budget_arithmetic():
    # Llama-2-7B q_proj: r = 32 in fp16 is 32 * (4096 + 4096) * 2 bytes.
    assert rank_for_budget(4096, 4096, 32 * 8192 * 2) == 32
    assert rank_for_budget(4096, 4096, 32 * 8192 * 2 - 1) == 31
    assert rank_for_budget(4096, 11008, 0) == 0
    assert rank_for_budget(4096, 11008, 1_000_000, dtype_bytes=1) == 1_000_000 // 15104
    assert rank_for_budget(8, 4, 10 ** 9) == 4  # capped at min(N, K)
    assert rank_for_budget(100, 28, 128 * 3 * 0.5, dtype_bytes=0.5) == 3
    for bad in [dict(N=0, K=4, extra_bytes=1), dict(N=4, K=4, extra_bytes=-1),
                dict(N=4, K=4, extra_bytes=1, dtype_bytes=0), dict(N=4.0, K=4, extra_bytes=1)]:
        with pytest.raises(ValueError):
            rank_for_budget(**bad)


def test_lowrank_term_forward_and_bytes():
    g = torch.Generator().manual_seed(9)
    L_A, L_B = torch.randn(6, 3, generator=g), torch.randn(3, 10, generator=g)
    term = LowRankTerm(L_A, L_B)
    x = torch.randn(2, 5, 10, generator=g)
    torch.testing.assert_close(term(x), x @ (L_A @ L_B).t(), rtol=1e-5, atol=1e-5)
    assert (term.rank, term.in_features, term.out_features) == (3, 10, 6)
    assert term.gpu_bytes == gpu_bytes(L_A, L_B) == (18 + 30) * 4
    half = LowRankTerm(L_A, L_B, dtype=torch.bfloat16)
    assert half.gpu_bytes == (18 + 30) * 2 and half(x).dtype == torch.float32
    clone = LowRankTerm(torch.zeros(6, 3), torch.zeros(3, 10))
    clone.load_state_dict(term.state_dict())
    torch.testing.assert_close(clone(x), term(x))
    with pytest.raises(ValueError, match="expected input"):
        term(torch.randn(4, 9))


# ----------------------------------------------------------------- errors
def test_error_cases():
    _, E, _, stats = problem(N=8, K=12, n=50)
    with pytest.raises(ValueError, match="rank must be in"):
        lowrank_compensator(E, "lorc", -1)
    with pytest.raises(ValueError, match=r"min\(N, K\) = 8"):
        lowrank_compensator(E, "aser", 9, stats)
    with pytest.raises(ValueError, match="rank must be an int"):
        lowrank_compensator(E, "lorc", 2.0)
    with pytest.raises(ValueError, match="method must be one of"):
        lowrank_compensator(E, "svd", 2, stats)
    with pytest.raises(ValueError, match="2-D float"):
        lowrank_compensator(E[0], "lorc", 1)
    with pytest.raises(ValueError, match="needs calibration"):
        lowrank_compensator(E, "lqer", 2)
    with pytest.raises(ValueError, match="K = 11 input channels, the activation statistics 12"):
        lowrank_compensator(E[:, :11], "aser", 2, stats)
    with pytest.raises(ValueError, match="gram='masked' needs method='aser'"):
        lowrank_compensator(E, "lqer", 2, stats, gram="masked")
    with pytest.raises(ValueError, match="masked_topk=0"):
        lowrank_compensator(E, "aser", 2, stats, gram="masked")
    with pytest.raises(ValueError, match="damp"):
        lowrank_compensator(E, "aser", 2, stats, damp=-1.0)
    with pytest.raises(ValueError, match="NaN"):
        lowrank_compensator(torch.full((3, 12), float("nan")), "lorc", 1)
    with pytest.raises(ValueError, match="features"):
        stats.add_batch(torch.randn(3, 11))
    with pytest.raises(ValueError, match="no calibration tokens"):
        ActivationStats(4).gram
    with pytest.raises(ValueError, match="keep_gram=False"):
        s = ActivationStats(4, keep_gram=False)
        s.add_batch(torch.randn(2, 4))
        s.gram
    with pytest.raises(ValueError, match="masked_topk"):
        ActivationStats(4, masked_topk=5)
    with pytest.raises(ValueError, match="do not match"):
        residual_after_lowrank(E, torch.zeros(8, 2), torch.zeros(3, 12))
    with pytest.raises(ValueError, match="factors must be"):
        LowRankTerm(torch.zeros(8, 2), torch.zeros(3, 12))
    zero_stats = ActivationStats(12)
    zero_stats.add_batch(torch.zeros(3, 12))
    with pytest.raises(ValueError, match="Gram is zero"):
        lowrank_compensator(E, "aser", 2, zero_stats)


def test_singular_gram_raises_damping():
    """Fewer tokens than channels: the undamped Gram is singular; the retry
    ridge still yields a factorization, and the fit reconstructs the observed
    subspace."""
    _, E, _, _ = problem(N=8, K=12)
    stats = ActivationStats(12, matmul_dtype=torch.float64)
    X = torch.randn(5, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    stats.add_batch(X)
    L_A, L_B = lowrank_compensator(E, "aser", 5, stats, damp=0.0, dtype=torch.float64)
    # Rank 5 covers the 5-dim span of the tokens: output error ~ 0.
    assert output_error(E, L_A, L_B, X) < 1e-8 * output_error(
        E, torch.zeros(8, 0, dtype=torch.float64), torch.zeros(0, 12, dtype=torch.float64), X)
