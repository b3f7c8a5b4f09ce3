"""Static low-rank compensators of the quantization error: LoRC, L²QER and
ASER's whitened SVD ("ER"), plus the activation statistics they need and the
pieces of the hybrid (low-rank term + dynamic compensation of what is left).

The common frame (``shared/reference/baselines.md`` §1). A quantized linear
computes ``y = W_hat x``; its error matrix is ``E = W - W_hat`` (``[N, K]``). A
static branch ``L_A (L_B x)`` with ``L_A [N, r]``, ``L_B [r, K]`` is chosen to
minimise the calibration output error::

    sum_t ||(E - L_A L_B) x_t||^2  =  n * ||(E - L_A L_B) S||_F^2,   S S^T = X^T X / n.

Substituting ``M = L_A L_B S`` turns this into a plain best rank-``r``
approximation of ``E S`` (Eckart-Young), so with ``SVD(E S) = U diag(sigma) V^T``

    L_A = U_r diag(sigma_r),    L_B = V_r^T S^-1,

and the objective left over is exactly ``sum_{i > r} sigma_i^2`` (the tail). The
methods differ only in ``S``:

* ``"lorc"``: ``S = I`` (plain SVD of ``E``; ZeroQuant-V2's LoRC, plain LQER);
* ``"lqer"``: ``S = diag(s)``, ``s`` the L²QER activation scale (see
  :meth:`ActivationStats.lqer_scale`): a diagonal heuristic for the Gram;
* ``"aser"``: ``S = chol(R + damp * mean(diag R) * I)``, the lower Cholesky factor
  of the damped Gram ``R = X^T X / n`` in float64 (ASER's whitening, QERA-exact:
  any square root of ``R`` gives the same optimum). This one is the exact
  minimiser of the (damped) objective; the other two are approximations of it.

The hybrid (baselines.md §5). Write ``E = L_A L_B + R_post`` and let the host
residual store hold ``R_post`` (:func:`residual_after_lowrank`) instead of
``E``. With the dynamic policy compensating token ``t``'s own top-``k`` ``|x|``
channels (indicator ``m_t``), the output error of token ``t`` is exactly::

    E x_t - L_A L_B x_t - R_post (m_t ⊙ x_t)  =  (E - L_A L_B) (x_t ⊙ (1 - m_t)),

(before the residual store is itself quantized). So the low-rank term of the
hybrid should be fitted to the Gram of the *uncovered* part of the activations,
``R' = E_t[(x_t ⊙ (1 - m_t)) (x_t ⊙ (1 - m_t))^T]``
(:attr:`ActivationStats.masked_gram`), i.e. run ``"aser"`` with
``gram="masked"``: the rank then goes to the error dynamic compensation will
not remove, and the tail of the singular values of ``E S'`` is exactly the
hybrid's remaining calibration error (tested).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from . import ops

Method = Literal["lorc", "lqer", "aser"]
METHODS: tuple[str, ...] = ("lorc", "lqer", "aser")
GramKind = Literal["full", "masked"]
GRAMS: tuple[str, ...] = ("full", "masked")
SVDKind = Literal["exact", "randomized"]

# L²QER's floor on the per-channel mean |x| before normalisation: keeps S = diag(s)
# invertible for dead channels (which then get no say in the fit).
MIN_ACT_SCALE = 1e-4
# Times the Cholesky damping is raised (x10 each) before giving up.
DAMP_RETRIES = 4
# Tokens whose [n, K] float32 copy is made at once by ActivationStats.add_batch.
STATS_CHUNK_TOKENS = 4096


# ---------------------------------------------------------------- statistics
class ActivationStats:
    """Streaming calibration statistics of the input ``x`` of one linear.

    Accumulates, over every token seen by :meth:`add_batch` (or the forward
    pre-hook of :meth:`attach`):

    * ``X^T X`` (the Gram; float64 running sum), for ASER's whitening;
    * per-channel ``sum |x|`` and ``sum x^2``;
    * per-channel ``max over add_batch calls of mean_t |x|``: L²QER's statistic,
      which is defined per calibration *batch*, so it depends on how the tokens
      are split into calls (one call = one batch, as in L²QER's profiler);
    * optionally (``masked_topk = k > 0``) the masked Gram
      ``sum_t x̄_t x̄_t^T`` with ``x̄_t = x_t ⊙ (1 - m_t)``, where ``m_t`` is the
      indicator of token ``t``'s own ``k`` largest ``|x|`` channels, chosen by
      :func:`qdec.ops.outlier_select` exactly as the ``dynamic`` policy of
      :class:`qdec.nn.QDECLinear` does at run time (same op, same tie rule). The
      kept part ``x̄_t`` is what dynamic compensation with ``k`` channels does
      *not* cover; see the module docstring for why the hybrid's low-rank term
      must be fitted to it (and not to the selected part ``x_t ⊙ m_t``).

    Memory: two ``[K, K]`` float64 matrices at most (1.6 GB each at
    ``K = 14336``); ``keep_gram=False`` skips the Gram when only L²QER/LoRC are
    wanted. Dtypes: each chunk's ``x^T x`` is computed in ``matmul_dtype``
    (float32 by default: fast, and a chunk is at most ``STATS_CHUNK_TOKENS``
    tokens) and added to float64 running sums, so the rounding does not grow
    with the number of tokens.

    Args:
        in_features: ``K``.
        masked_topk: ``k`` of the masked Gram (0 = do not accumulate it).
        keep_gram: accumulate the full Gram (needed by ``"aser"``).
        device: where the sums live (default CPU); inputs are moved there.
        matmul_dtype: dtype of the per-chunk products (float32 or float64).
    """

    def __init__(self, in_features: int, masked_topk: int = 0, keep_gram: bool = True,
                 device: torch.device | str = "cpu",
                 matmul_dtype: torch.dtype = torch.float32) -> None:
        if not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"in_features must be a positive int, got {in_features!r}")
        if not isinstance(masked_topk, int) or not 0 <= masked_topk <= in_features:
            raise ValueError(f"masked_topk must be an int in [0, in_features={in_features}], "
                             f"got {masked_topk!r}")
        if matmul_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"matmul_dtype must be float32 or float64, got {matmul_dtype}")
        K = in_features
        self.in_features = K
        self.masked_topk = masked_topk
        self.matmul_dtype = matmul_dtype
        self.count = 0
        f64 = dict(dtype=torch.float64, device=device)
        self.gram_sum: Tensor | None = torch.zeros(K, K, **f64) if keep_gram else None
        self.masked_gram_sum: Tensor | None = torch.zeros(K, K, **f64) if masked_topk else None
        self.abs_sum = torch.zeros(K, **f64)
        self.square_sum = torch.zeros(K, **f64)
        self.abs_mean_batch_max = torch.zeros(K, **f64)

    @torch.no_grad()
    def add_batch(self, x: Tensor) -> None:
        """Add tokens ``x [..., K]`` (any float dtype; flattened to ``[n, K]``) as
        one calibration batch."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"ActivationStats: input has {x.shape[-1]} features, expected "
                             f"{self.in_features} (shape {tuple(x.shape)})")
        if not x.is_floating_point():
            raise ValueError(f"ActivationStats: input must be floating point, got {x.dtype}")
        x = x.detach().reshape(-1, self.in_features)
        n = x.shape[0]
        if n == 0:
            return
        device = self.abs_sum.device
        batch_abs = torch.zeros_like(self.abs_sum)
        for t0 in range(0, n, STATS_CHUNK_TOKENS):
            chunk = x[t0:t0 + STATS_CHUNK_TOKENS].to(device)
            xf = chunk.to(self.matmul_dtype)
            batch_abs += xf.abs().sum(0, dtype=torch.float64)
            self.square_sum += xf.square().sum(0, dtype=torch.float64)
            if self.gram_sum is not None:
                self.gram_sum += (xf.t() @ xf).double()
            if self.masked_gram_sum is not None:
                # Select on the input as given (the op's dtypes are those of the
                # model at run time); float64 calibration data is selected in float32.
                sel_in = chunk if chunk.dtype in (torch.float32, torch.float16,
                                                  torch.bfloat16) else chunk.float()
                selected = ops.outlier_select(sel_in, self.masked_topk)
                kept = xf.scatter(1, selected, 0.0)  # x ⊙ (1 - m_t)
                self.masked_gram_sum += (kept.t() @ kept).double()
        self.abs_sum += batch_abs
        torch.maximum(self.abs_mean_batch_max, batch_abs / n, out=self.abs_mean_batch_max)
        self.count += n

    def attach(self, module: nn.Module) -> torch.utils.hooks.RemovableHandle:
        """Accumulate every input of ``module`` (e.g. an ``nn.Linear``) from now
        on, one forward call = one batch; remove the returned handle to stop."""
        def hook(mod: nn.Module, args: tuple) -> None:
            self.add_batch(args[0])
        return module.register_forward_pre_hook(hook)

    # ------------------------------------------------------------ read-outs
    def _require_tokens(self) -> None:
        if self.count == 0:
            raise ValueError("ActivationStats: no calibration tokens were added")

    @property
    def gram(self) -> Tensor:
        """``R = X^T X / n``, float64 ``[K, K]``."""
        self._require_tokens()
        if self.gram_sum is None:
            raise ValueError("ActivationStats: the Gram was not kept (keep_gram=False)")
        return self.gram_sum / self.count

    @property
    def masked_gram(self) -> Tensor:
        """``R' = E_t[x̄_t x̄_t^T]``, ``x̄_t = x_t ⊙ (1 - m_t)`` (each token's own top-
        ``masked_topk`` channels zeroed), float64 ``[K, K]``."""
        self._require_tokens()
        if self.masked_gram_sum is None:
            raise ValueError("ActivationStats: no masked Gram (created with masked_topk=0)")
        return self.masked_gram_sum / self.count

    @property
    def abs_mean(self) -> Tensor:
        """``E[|x_i|]`` over all tokens, float64 ``[K]``."""
        self._require_tokens()
        return self.abs_sum / self.count

    @property
    def mean_square(self) -> Tensor:
        """``E[x_i^2]`` over all tokens, float64 ``[K]``."""
        self._require_tokens()
        return self.square_sum / self.count

    def lqer_scale(self) -> Tensor:
        """L²QER's ``s``: ``max over batches of mean_t |x_i|``, clamped to
        ``>= MIN_ACT_SCALE``, then divided by ``sqrt(min s * max s)`` (so that
        ``min s * max s = 1``, centring the scales around 1 in log space). The
        normalisation does not change the fit (a constant factor in ``S``
        cancels between ``L_A`` and ``L_B``); it keeps the numbers O(1).
        float64 ``[K]``."""
        self._require_tokens()
        s = self.abs_mean_batch_max.clamp(min=MIN_ACT_SCALE)
        return s / (s.min() * s.max()).sqrt()


# ------------------------------------------------------------- the factors
def _check_error_matrix(E: Tensor, name: str) -> None:
    if E.dim() != 2 or not E.is_floating_point():
        raise ValueError(f"{name}: the error matrix must be a 2-D float tensor [N, K], got "
                         f"{E.dtype} of shape {tuple(E.shape)}")
    if E.shape[0] == 0 or E.shape[1] == 0:
        raise ValueError(f"{name}: empty error matrix of shape {tuple(E.shape)}")
    if not torch.isfinite(E).all():
        raise ValueError(f"{name}: the error matrix has NaN or infinite entries")


def _check_rank(rank: int, N: int, K: int, name: str) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise ValueError(f"{name}: rank must be an int, got {rank!r}")
    if not 0 <= rank <= min(N, K):
        raise ValueError(f"{name}: rank must be in [0, min(N, K) = {min(N, K)}] for an error "
                         f"matrix [{N}, {K}], got {rank}")


def _check_stats(stats: ActivationStats | None, method: str, K: int, name: str
                 ) -> ActivationStats:
    if stats is None:
        raise ValueError(f"{name}: method {method!r} needs calibration ActivationStats")
    if not isinstance(stats, ActivationStats):
        raise ValueError(f"{name}: stats must be ActivationStats, got {type(stats).__name__}")
    if stats.in_features != K:
        raise ValueError(f"{name}: the error matrix has K = {K} input channels, the "
                         f"activation statistics {stats.in_features}")
    return stats


def _damped_cholesky(R: Tensor, damp: float, name: str) -> Tensor:
    """Lower ``C`` with ``C C^T = R + d * mean(diag R) * I`` (float64), ``d = damp``
    raised x10 up to ``DAMP_RETRIES`` times if the factorization fails (a Gram
    of fewer tokens than channels is singular)."""
    K = R.shape[0]
    mean_diag = torch.diagonal(R).mean().item()
    if mean_diag <= 0:
        raise ValueError(f"{name}: the activation Gram is zero (all calibration inputs 0)")
    eye = torch.eye(K, dtype=R.dtype, device=R.device)
    tried = []
    d = damp
    for _ in range(DAMP_RETRIES + 1):
        C, info = torch.linalg.cholesky_ex(R + d * mean_diag * eye)
        if info.item() == 0:
            return C
        tried.append(d)
        d = max(d * 10.0, 1e-10)  # damp=0 on a singular Gram: start from a tiny ridge
    raise ValueError(f"{name}: the damped Gram [{K}, {K}] is not positive definite with "
                     f"damp in {tried} (mean diag {mean_diag:.3g})")


def _whitening(method: str, K: int, stats: ActivationStats | None, damp: float,
               gram: str, name: str) -> Tensor | None:
    """``S`` of ``method`` as ``None`` (identity), a float64 vector (diagonal)
    or a float64 lower-triangular matrix."""
    if method not in METHODS:
        raise ValueError(f"{name}: method must be one of {METHODS}, got {method!r}")
    if gram not in GRAMS:
        raise ValueError(f"{name}: gram must be one of {GRAMS}, got {gram!r}")
    if gram == "masked" and method != "aser":
        raise ValueError(f"{name}: gram='masked' needs method='aser' (the masked Gram is "
                         f"not diagonal), got method={method!r}")
    if not (isinstance(damp, (int, float)) and math.isfinite(damp) and damp >= 0):
        raise ValueError(f"{name}: damp must be a finite number >= 0, got {damp!r}")
    if method == "lorc":
        return None
    stats = _check_stats(stats, method, K, name)
    if method == "lqer":
        return stats.lqer_scale()
    R = stats.masked_gram if gram == "masked" else stats.gram
    return _damped_cholesky(R, float(damp), name)


def _whiten(E64: Tensor, S: Tensor | None) -> Tensor:
    if S is None:
        return E64
    if S.dim() == 1:
        return E64 * S.to(E64.device)
    return E64 @ S.to(E64.device)


def lowrank_compensator(
    E: Tensor,
    method: Method,
    rank: int,
    stats: ActivationStats | None = None,
    damp: float = 1e-2,
    *,
    gram: GramKind = "full",
    svd: SVDKind = "exact",
    oversample: int = 16,
    niter: int = 4,
    dtype: torch.dtype = torch.float32,
    name: str = "linear",
) -> tuple[Tensor, Tensor]:
    """Rank-``rank`` factors with ``L_A @ L_B ≈ E`` in the whitened metric of
    ``method`` (closed form: the module docstring).

    Args:
        E: float ``[N, K]``, the error ``W - W_hat`` (rows = output channels).
            ASER outlier extraction happens *before* this call: quantize ``W`` with
            the columns of :func:`aser_outlier_channels` zeroed
            (:func:`zero_columns`) and pass ``E = W - W_hat_rest``, which then holds
            the whole outlier columns for the SVD to absorb.
        method: ``"lorc"`` (``S = I``), ``"lqer"`` (``S = diag(s)``) or
            ``"aser"`` (``S`` = Cholesky factor of the damped Gram).
        rank: ``r`` in ``[0, min(N, K)]`` (see :func:`rank_for_budget`).
        stats: calibration statistics of this linear's input (``"lqer"``,
            ``"aser"``); ignored by ``"lorc"``.
        damp: ASER's relative damping ``λ``: ``S S^T = R + λ mean(diag R) I``
            (``>= 0``; raised x10 if the Cholesky factorization fails). The fit
            then minimises ``||(E - L) X||^2 / n + λ mean(diag R) ||E - L||_F^2``:
            ``λ`` trades calibration fit for a pull toward ``E`` itself in
            directions calibration never excited.
        gram: ``"full"`` (``R = X^T X / n``) or ``"masked"`` (``R'``, the hybrid's
            Gram of the part dynamic compensation leaves; ``"aser"`` only).
        svd: ``"exact"`` (``torch.linalg.svd``, float64) or ``"randomized"``
            (``torch.svd_lowrank`` with ``rank + oversample`` columns and ``niter``
            power iterations: near-optimal and much faster for ``r << min(N, K)``).
        dtype: dtype of the returned factors.
        name: the layer's name, for error messages.

    Returns:
        ``(L_A, L_B)``: ``dtype`` ``[N, r]`` and ``[r, K]`` on ``E.device``;
        ``L_A = U_r diag(sigma_r)``, ``L_B = V_r^T S^-1`` (``S^-1`` applied by a
        triangular solve, never formed).
    """
    _check_error_matrix(E, name)
    N, K = E.shape
    _check_rank(rank, N, K, name)
    if svd not in ("exact", "randomized"):
        raise ValueError(f"{name}: svd must be 'exact' or 'randomized', got {svd!r}")
    S = _whitening(method, K, stats, damp, gram, name)
    E64 = E.detach().to(torch.float64)
    if rank == 0:
        return E.new_zeros(N, 0, dtype=dtype), E.new_zeros(0, K, dtype=dtype)
    M = _whiten(E64, S)
    if svd == "exact" or rank + oversample >= min(N, K):
        U, sigma, Vh = torch.linalg.svd(M, full_matrices=False)
        U, sigma, V = U[:, :rank], sigma[:rank], Vh[:rank].t()
    else:
        # svd_lowrank draws a random sketch from the global generator: seed a
        # forked one, so results are reproducible and the caller's stream untouched.
        cuda = [M.device] if M.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(0)
            U, sigma, V = torch.svd_lowrank(M, q=rank + oversample, niter=niter)
        U, sigma, V = U[:, :rank], sigma[:rank], V[:, :rank]
    L_A = U * sigma
    if S is None:
        L_B = V.t()
    elif S.dim() == 1:
        L_B = V.t() / S.to(V.device)
    else:
        # L_B = V_r^T S^-1  <=>  S^T L_B^T = V_r, an upper-triangular system.
        L_B = torch.linalg.solve_triangular(S.t().to(V.device), V, upper=True).t()
    return L_A.to(dtype).contiguous(), L_B.to(dtype).contiguous()


def whitened_spectrum(E: Tensor, method: Method, stats: ActivationStats | None = None,
                      damp: float = 1e-2, *, gram: GramKind = "full", name: str = "linear"
                      ) -> Tensor:
    """Singular values (float64 ``[min(N, K)]``, descending) of ``E S`` for
    ``method``: the rank-``r`` fit leaves exactly ``sum_{i >= r} sigma_i^2`` of
    the (damped) objective, so ``cumsum(sigma^2) / sum(sigma^2)`` is the share a
    given rank captures. Arguments as in :func:`lowrank_compensator`."""
    _check_error_matrix(E, name)
    S = _whitening(method, E.shape[1], stats, damp, gram, name)
    return torch.linalg.svdvals(_whiten(E.detach().to(torch.float64), S))


def expected_output_error(E: Tensor, L_A: Tensor | None, L_B: Tensor | None,
                          stats: ActivationStats, *, gram: GramKind = "full",
                          name: str = "linear") -> float:
    """Calibration mean squared output error ``E_t ||(E - L_A L_B) x_t||^2`` per
    token, computed from the Gram as ``tr(D R D^T)``, ``D = E - L_A L_B`` in
    float64. With ``gram="masked"`` it is the hybrid's error
    ``E_t ||D (x_t ⊙ (1 - m_t))||^2`` (an unquantized residual store holding
    ``D``). ``L_A = L_B = None`` gives the error with no low-rank term."""
    _check_error_matrix(E, name)
    stats = _check_stats(stats, "expected_output_error", E.shape[1], name)
    if gram not in GRAMS:
        raise ValueError(f"{name}: gram must be one of {GRAMS}, got {gram!r}")
    D = E.detach().to(torch.float64)
    if (L_A is None) != (L_B is None):
        raise ValueError(f"{name}: give both L_A and L_B, or neither")
    if L_A is not None:
        D = residual_after_lowrank(D, L_A, L_B, name=name)
    R = stats.masked_gram if gram == "masked" else stats.gram
    return float(((D @ R.to(D.device)) * D).sum())


# ------------------------------------------------------- ASER outlier columns
def aser_outlier_channels(weight: Tensor, stats: ActivationStats, count: int,
                          name: str = "linear") -> Tensor:
    """The ``count`` input channels with the largest activation x weight
    magnitude, ``sqrt(E[x_j^2]) * ||W[:, j]||_2`` (the RMS output energy channel
    ``j`` alone carries), most salient first: int64 ``[count]``.

    This is our reading of ASER's outlier extraction (baselines.md §2, an
    interpretation; ASER's own score is unpublished): zero these columns of
    ``W`` before quantizing (:func:`zero_columns`), so that ``E = W - W_hat``
    holds them whole and the whitened SVD absorbs them with no sparse side GEMM.
    Whether to re-quantize is the caller's choice.

    Args:
        weight: float ``[N, K]`` (the FP weight, in the basis being quantized).
        stats: this linear's input statistics (``K`` channels).
        count: ``f`` in ``[0, K]``.
    """
    _check_error_matrix(weight, name)
    K = weight.shape[1]
    stats = _check_stats(stats, "aser outlier extraction", K, name)
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= K:
        raise ValueError(f"{name}: count must be an int in [0, K = {K}], got {count!r}")
    score = stats.mean_square.sqrt().to(weight.device) * weight.detach().double().norm(dim=0)
    # Stable sort: equal scores go to the smaller index, as in outlier_select.
    return torch.sort(score, descending=True, stable=True).indices[:count].contiguous()


def zero_columns(weight: Tensor, channels: Tensor) -> Tensor:
    """A copy of ``weight [N, K]`` with the columns ``channels`` (int ``[f]``) set
    to zero."""
    out = weight.detach().clone()
    out[:, channels.to(torch.int64).to(weight.device)] = 0
    return out


# ------------------------------------------------------ budget and runtime
def rank_for_budget(N: int, K: int, extra_bytes: int | float, dtype_bytes: int | float = 2
                    ) -> int:
    """The largest rank whose factors fit ``extra_bytes``: ``r (N + K)`` values of
    ``dtype_bytes`` each, so ``r = floor(extra_bytes / ((N + K) dtype_bytes))``,
    capped at ``min(N, K)`` (a larger rank cannot reconstruct more).

    Args:
        N, K: output and input features (positive ints).
        extra_bytes: the budget, ``>= 0``.
        dtype_bytes: bytes per stored value, ``> 0`` (2 for fp16; fractional for
            sub-byte codes, e.g. 0.5 for 4-bit, scales not counted).
    """
    for label, v in (("N", N), ("K", K)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"rank_for_budget: {label} must be a positive int, got {v!r}")
    if not (isinstance(extra_bytes, (int, float)) and math.isfinite(extra_bytes)
            and extra_bytes >= 0):
        raise ValueError(f"rank_for_budget: extra_bytes must be a finite number >= 0, "
                         f"got {extra_bytes!r}")
    if not (isinstance(dtype_bytes, (int, float)) and math.isfinite(dtype_bytes)
            and dtype_bytes > 0):
        raise ValueError(f"rank_for_budget: dtype_bytes must be > 0, got {dtype_bytes!r}")
    per_rank = (N + K) * dtype_bytes
    # The small epsilon keeps an exact budget (r * per_rank bytes) from rounding down.
    return min(int(math.floor(extra_bytes / per_rank + 1e-9)), min(N, K))


def gpu_bytes(L_A: Tensor, L_B: Tensor) -> int:
    """Resident bytes of the factors as stored (``numel * element_size``), which
    is also what a decode step reads from device memory for the term."""
    return L_A.numel() * L_A.element_size() + L_B.numel() * L_B.element_size()


def residual_after_lowrank(E: Tensor, L_A: Tensor, L_B: Tensor, name: str = "linear") -> Tensor:
    """``E - L_A @ L_B`` (``[N, K]``, in ``E``'s dtype; the product is formed in
    float64): what the low-rank term leaves, whose quantized form
    (:func:`qdec.quant.residual.quantize_residual`) becomes the hybrid's host
    residual store."""
    if E.dim() != 2:
        raise ValueError(f"{name}: E must be 2-D [N, K], got shape {tuple(E.shape)}")
    N, K = E.shape
    if (L_A.dim() != 2 or L_B.dim() != 2 or L_A.shape[0] != N or L_B.shape[1] != K
            or L_A.shape[1] != L_B.shape[0]):
        raise ValueError(f"{name}: factors {tuple(L_A.shape)} x {tuple(L_B.shape)} do not "
                         f"match E [{N}, {K}] (want [N, r] x [r, K])")
    product = L_A.to(E.device, torch.float64) @ L_B.to(E.device, torch.float64)
    return (E.to(torch.float64) - product).to(E.dtype)


class LowRankTerm(nn.Module):
    """The static branch ``y = (x @ L_B^T) @ L_A^T``.

    The rank-``r`` intermediate comes first: ``2 r (N + K)`` flops per token,
    instead of ``2 N K`` for a formed ``L_A L_B``. The factors are buffers (they
    follow ``.to()`` and round-trip through ``state_dict``); compute is in their
    dtype and the result is returned in ``x``'s dtype.

    Args:
        L_A: float ``[N, r]``.
        L_B: float ``[r, K]``.
        dtype: store the factors in this dtype (default: as given).
    """

    def __init__(self, L_A: Tensor, L_B: Tensor, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if L_A.dim() != 2 or L_B.dim() != 2 or L_A.shape[1] != L_B.shape[0]:
            raise ValueError(f"LowRankTerm: factors must be [N, r] and [r, K], got "
                             f"{tuple(L_A.shape)} and {tuple(L_B.shape)}")
        dtype = dtype or L_A.dtype
        self.register_buffer("lowrank_a", L_A.detach().to(dtype).contiguous())
        self.register_buffer("lowrank_b", L_B.detach().to(dtype).contiguous())

    @property
    def rank(self) -> int:
        return self.lowrank_a.shape[1]

    @property
    def in_features(self) -> int:
        return self.lowrank_b.shape[1]

    @property
    def out_features(self) -> int:
        return self.lowrank_a.shape[0]

    @property
    def gpu_bytes(self) -> int:
        """Resident bytes of both factors."""
        return gpu_bytes(self.lowrank_a, self.lowrank_b)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"LowRankTerm: expected input [..., {self.in_features}], got "
                             f"{tuple(x.shape)}")
        a, b = self.lowrank_a, self.lowrank_b
        xf = x.to(b.dtype)  # the op wants one dtype: compute in the factors'
        needs_grad = torch.is_grad_enabled() and (
            xf.requires_grad or a.requires_grad or b.requires_grad)
        if b.dtype in (torch.float32, torch.float16, torch.bfloat16) and not needs_grad:
            # One pass over both factors (one launch on CUDA), t = L_B x in float32.
            return ops.lowrank_linear(xf, a, b).to(x.dtype)
        # float64 factors, or a graph to differentiate: the op has neither.
        return ((xf @ b.t()) @ a.t()).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, dtype={self.lowrank_a.dtype}")
