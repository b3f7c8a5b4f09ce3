"""``QDECLinear``: a weight-only quantized linear layer with dynamic residual
compensation, built on the ``torch.ops.qdec`` operators."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from .lowrank import LowRankTerm

SelectionPolicy = Literal["dynamic", "static", "random", "oracle"]
POLICIES: tuple[str, ...] = ("dynamic", "static", "random", "oracle")


class QDECLinear(nn.Module):
    """``y = x @ W_hat^T (+ bias) + sum_{j in S(x)} R[:, j] x[j]`` per token.

    With a low-rank term attached (:meth:`set_lowrank`, the *hybrid*), the
    output also gets ``L_A (L_B x)`` from GPU-resident factors, and ``R`` is
    then the part of the error that term leaves (``W - W_hat - L_A L_B``).

    ``W_hat`` is packed on the module's device; the residual store ``R`` stays in
    host memory (pinned when CUDA is present, read zero-copy by the CUDA kernel),
    and is *not* moved by ``.to()``/``.cuda()``: only its per-output scales and
    the selection state follow the module.

    Selection policies (what ``S`` is, per token row):
        ``dynamic``: the ``k`` largest ``|x|`` (QDEC);
        ``static``: a fixed channel set chosen once from calibration statistics
        (``static_channels``);
        ``random``: ``k`` channels drawn uniformly per token (seeded);
        ``oracle``: the ``k`` largest ``|x_j| * ||R[:, j]||_2``, the channels whose
        residual contributes most to this token's output error.

    Args:
        qweight: int32 ``[N, ceil(K/32) * bits]`` (layout: :mod:`qdec.packing`).
        scales, zeros: ``[N, ceil(K/G)]``; ``zeros=None`` for symmetric codes.
        bits, group_size, in_features: the weight format (see :mod:`qdec.ops`).
        residual: int32 ``[K, ceil(N/32) * residual_bits]``, or ``None`` (no
            compensation possible; ``k`` must stay 0).
        residual_scales: float32 ``[N]``.
        residual_bits: code width of the residual, 2..8.
        bias: ``[N]`` or ``None``.
        k: channels compensated per token: an int count, or a float fraction of
            ``in_features`` in ``[0, 1]``.
        policy: one of ``POLICIES``.
        compensate_prefill: also compensate multi-token (prefill) steps, each
            token with its own channels (default ``True``); otherwise prefill uses
            the plain quantized matmul.
        input_permutation: int64 ``[K]`` or ``None``. Column ``j`` of the packed
            weight (and row ``j`` of the residual store) multiplies input
            ``x[perm[j]]``: how act-order GPTQ checkpoints, whose groups are not
            contiguous runs of channels, are represented losslessly
            (:mod:`qdec.formats.gptq`). The input is gathered once per call;
            channel selection then happens in the permuted order, which picks
            the same channels.
    """

    def __init__(
        self,
        qweight: Tensor,
        scales: Tensor,
        zeros: Tensor | None,
        bits: int,
        group_size: int,
        in_features: int,
        residual: Tensor | None = None,
        residual_scales: Tensor | None = None,
        residual_bits: int = 4,
        bias: Tensor | None = None,
        k: int | float = 0,
        policy: SelectionPolicy = "dynamic",
        compensate_prefill: bool = True,
        input_permutation: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(qweight.shape[0])
        self.bits = int(bits)
        self.group_size = int(group_size)
        self.residual_bits = int(residual_bits)
        self.compensate_prefill = compensate_prefill
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        self.register_buffer("bias", bias)
        if (residual is None) != (residual_scales is None):
            raise ValueError("residual and residual_scales must be given together")
        self.residual = None if residual is None else place_residual(residual)
        self.register_buffer("residual_scales", residual_scales)
        self.register_buffer("static_channels", None)
        self.register_buffer("residual_col_norms", None)
        self.register_buffer("input_permutation", None)
        if input_permutation is not None:
            self.set_input_permutation(input_permutation)
        self.lowrank: LowRankTerm | None = None
        self.seed = 0
        self._rng: torch.Generator | None = None
        self._policy: str = "dynamic"
        self._k = 0
        self.policy = policy
        self.k = k
        # Dense float32 copies of W_hat and R for fast *simulation* of the exact
        # per-token semantics in evaluation (see simulate_dense); built lazily.
        self.simulate_dense = False
        # Thread blocks the CUDA compensation may occupy beside the GEMV
        # (0 = automatic); set from a tune config by qdec.patch.configure.
        self.sm_budget = 0
        self._selection_shards = 1
        self._dense_cache: tuple[Tensor, Tensor | None] | None = None

    # ------------------------------------------------------------------ state
    @property
    def k(self) -> int:
        """Channels compensated per token (an int in ``[0, in_features]``)."""
        return self._k

    @k.setter
    def k(self, value: int | float) -> None:
        K = self.in_features
        if isinstance(value, float):  # a fraction of the input channels
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"k as a fraction must be in [0, 1], got {value}")
            value = round(value * K)
        value = int(value)
        if not 0 <= value <= K:
            raise ValueError(f"k must be in [0, in_features={K}], got {value}")
        if value > 0 and self.residual is None:
            raise ValueError("k > 0 needs a residual store; this layer has none")
        self._k = value

    @property
    def policy(self) -> str:
        return self._policy

    @policy.setter
    def policy(self, value: str) -> None:
        if value not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {value!r}")
        self._policy = value

    @property
    def selection_shards(self) -> int:
        """Contiguous equal slices of the input channels that select on their
        own (default 1: one global top-k).

        With ``s > 1`` the ``dynamic`` policy takes the top ``ceil(k / s)``
        ``|x|`` of each slice, ``s * ceil(k / s)`` channels in all: what a
        row-parallel layer (o_proj, down_proj) does under tensor parallelism
        of degree ``s``, where each rank sees only its slice of ``x``
        (:mod:`qdec.vllm`). Set it to measure that on one process.
        """
        return self._selection_shards

    @selection_shards.setter
    def selection_shards(self, value: int) -> None:
        value = int(value)
        if value < 1 or self.in_features % value:
            raise ValueError(f"selection_shards must be >= 1 and divide in_features="
                             f"{self.in_features}, got {value}")
        self._selection_shards = value

    @property
    def channels_per_token(self) -> int:
        """Channels compensated per token: ``k``, or ``s * ceil(k / s)`` with
        ``selection_shards = s``."""
        s = self._selection_shards
        return self.k if s == 1 else s * -(-self.k // s)

    def set_static_channels(self, channels: Tensor) -> None:
        """Fix the channel ranking of the ``static`` policy: int64 ``[m]``,
        most salient first; the first ``k`` are used."""
        channels = channels.to(torch.int64).flatten()
        if channels.numel() and (channels.min() < 0 or channels.max() >= self.in_features):
            raise ValueError(f"static channels must lie in [0, {self.in_features})")
        self.static_channels = channels.to(self.qweight.device)

    def set_input_permutation(self, perm: Tensor | None) -> None:
        """Set (or clear, with ``None``) the input permutation; see the class doc."""
        if perm is None:
            self.input_permutation = None
            return
        perm = perm.to(torch.int64).flatten()
        K = self.in_features
        if perm.numel() != K or not torch.equal(perm.sort().values.cpu(), torch.arange(K)):
            raise ValueError(f"input_permutation must be a permutation of range({K}), got "
                             f"{perm.numel()} values")
        self.input_permutation = perm.to(self.qweight.device)

    def set_lowrank(self, term: LowRankTerm | None, residual: Tensor | None = None,
                    residual_scales: Tensor | None = None) -> None:
        """Attach a GPU-resident low-rank term (the hybrid), or detach it with ``None``.

        Args:
            term: ``L_A [N, r]``, ``L_B [r, K]`` in the layer's (permuted) input order.
            residual, residual_scales: the residual store of what the term leaves,
                ``W - W_hat - L_A L_B`` (:func:`qdec.lowrank.residual_after_lowrank`
                then :func:`qdec.quant.residual.quantize_residual`). Without them the
                current store is kept, which then double-counts the error the term
                already removes: only sensible with ``k = 0`` (low-rank only).
        """
        if term is not None and (term.in_features != self.in_features
                                 or term.out_features != self.out_features):
            raise ValueError(f"low-rank term is [{term.out_features}, {term.in_features}] but "
                             f"the layer is [{self.out_features}, {self.in_features}]")
        if (residual is None) != (residual_scales is None):
            raise ValueError("residual and residual_scales must be given together")
        self.lowrank = None if term is None else term.to(self.qweight.device)
        if residual is not None:
            self.residual = place_residual(residual)
            self.residual_scales = residual_scales.to(self.qweight.device)
            self.residual_col_norms = None
        self._dense_cache = None

    # ------------------------------------------------------------------ costs
    @property
    def fetched_bytes_per_token(self) -> int:
        """Bytes of the residual store read over PCIe per token at the current
        ``k``: ``k`` packed rows of ``ceil(N/32) * residual_bits`` int32 words.
        (The channel indices are chosen on the GPU; the per-row scales live
        there too.) The one definition every cost report uses."""
        if self.residual is None or self.k == 0:
            return 0
        return self.channels_per_token * self.fetched_bytes_per_channel

    @property
    def fetched_bytes_per_channel(self) -> int:
        """Bytes of the residual store read per token for one compensated
        input channel (one packed row of ``R^T``); 0 without a residual."""
        if self.residual is None:
            return 0
        return self.residual.shape[1] * self.residual.element_size()

    @property
    def gpu_extra_bytes(self) -> int:
        """Device-resident bytes beyond the packed weight: the residual's
        per-output scales (needed only while ``k > 0``) and the low-rank
        factors, if any."""
        extra = 0 if self.residual_scales is None or self.k == 0 else (
            self.residual_scales.numel() * self.residual_scales.element_size())
        return extra + (0 if self.lowrank is None else self.lowrank.gpu_bytes)

    def reset_rng(self, seed: int | None = None) -> None:
        """Restart the random policy's stream (from ``seed`` if given)."""
        if seed is not None:
            self.seed = seed
        self._rng = None

    def _col_norms(self) -> Tensor:
        if self.residual_col_norms is None:
            from .reference import residual_rows_ref

            rows = residual_rows_ref(self.residual, self.residual_scales.cpu(), self.residual_bits)
            self.residual_col_norms = rows.norm(dim=1).to(self.qweight.device)
        return self.residual_col_norms

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.residual is not None:
            destination[prefix + "residual"] = self.residual
        destination[prefix + "k"] = torch.tensor(self.k)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        residual = state_dict.pop(prefix + "residual", None)
        k = state_dict.pop(prefix + "k", None)
        # A hybrid's low-rank term loads into a layer built without one: create it
        # here, the module's own loading then fills it.
        key_a, key_b = prefix + "lowrank.lowrank_a", prefix + "lowrank.lowrank_b"
        if self.lowrank is None and key_a in state_dict and key_b in state_dict:
            self.lowrank = LowRankTerm(state_dict[key_a].clone(), state_dict[key_b].clone())
        # Optional buffers that are None here still load when present there.
        for name in ("zeros", "bias", "residual_scales", "static_channels", "residual_col_norms",
                     "input_permutation"):
            key = prefix + name
            if key in state_dict and getattr(self, name) is None:
                setattr(self, name, state_dict[key].clone())
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if residual is not None:
            self.residual = place_residual(residual.clone())
        if k is not None:
            self.k = int(k)

    def extra_repr(self) -> str:
        gs = "row" if self.group_size == -1 else self.group_size
        sym = "sym" if self.zeros is None else "asym"
        res = f"residual_bits={self.residual_bits}" if self.residual is not None else "no residual"
        extra = "" if self.input_permutation is None else ", input_permutation"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, group_size={gs}, {sym}, k={self.k}, {res}, "
                f"policy={self.policy}, bias={self.bias is not None}{extra}")

    # ---------------------------------------------------------------- compute
    def _weight_args(self, dtype: torch.dtype):
        scales = self.scales if self.scales.dtype == dtype else self.scales.to(dtype)
        zeros = self.zeros
        if zeros is not None and zeros.dtype != dtype:
            zeros = zeros.to(dtype)
        return self.qweight, scales, zeros, self.bits, self.group_size

    def select_channels(self, x2d: Tensor) -> Tensor | None:
        """Channels int64 ``[rows, k]`` the current policy compensates for each
        row of ``x2d`` (``None`` for ``dynamic``: the op selects them itself)."""
        k, rows = self.k, x2d.shape[0]
        shards = self._selection_shards
        if shards > 1:
            if self.policy != "dynamic":
                raise ValueError(f"selection_shards={shards} is defined for the dynamic policy "
                                 f"only, not {self.policy!r}")
            return sharded_outlier_select(x2d, k, shards)
        if self.policy == "dynamic":
            return None
        if self.policy == "static":
            return self._static_channels(k).to(x2d.device).expand(rows, k).contiguous()
        if self.policy == "random":
            if self._rng is None:
                self._rng = torch.Generator(device="cpu").manual_seed(self.seed)
            # One stream per layer that advances call by call: every token gets
            # a fresh draw, and a run is reproducible from the seed.
            scores = torch.rand(rows, self.in_features, generator=self._rng)
            return scores.topk(k, dim=-1).indices.to(x2d.device)
        score = x2d.float().abs() * self._col_norms().to(x2d.device)
        return ops.outlier_select(score, k)

    def _static_channels(self, k: int) -> Tensor:
        """The static policy's first ``k`` channels (int64 ``[k]``)."""
        if self.static_channels is None or self.static_channels.numel() < k:
            raise RuntimeError("static policy needs set_static_channels() with >= k channels")
        return self.static_channels[:k]

    def layer_input(self, x: Tensor) -> Tensor:
        """``x`` in the order of the packed weight's columns (the input
        permutation applied, if any). Calibration hooks that rank or
        accumulate channel statistics must see this, not the raw input."""
        if self.input_permutation is None:
            return x
        return x.index_select(-1, self.input_permutation.to(x.device))

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input [..., {self.in_features}], got {tuple(x.shape)}")
        rows = math.prod(x.shape[:-1])
        k = self.k if (rows <= 1 or self.compensate_prefill) else 0
        x = self.layer_input(x)
        if self.simulate_dense:
            y = self._forward_dense(x, k)
        elif k == 0:
            y = ops.quantized_matmul(x, *self._weight_args(x.dtype))
        else:
            channels = self.select_channels(x.reshape(-1, self.in_features))
            if channels is not None:
                k = channels.shape[-1]
                channels = channels.reshape(*x.shape[:-1], k)
            y = ops.compensated_linear(x, *self._weight_args(x.dtype), self.residual,
                                       self.residual_scales, self.residual_bits, k, channels,
                                       self.sm_budget)
        if self.lowrank is not None:
            y = y + self.lowrank(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def dense_weights(self) -> tuple[Tensor, Tensor | None]:
        """Float32 ``W_hat`` ``[N, K]`` and the decoded residual ``R^T``
        ``[K, N]`` (row j is channel j's column ``R[:, j]``; ``None`` without a
        residual store), built once and cached for the dense simulation and
        for calibration statistics (:mod:`qdec.budget`)."""
        if self._dense_cache is None:
            w = ops.dequantize(*self._weight_args(torch.float32), self.in_features)
            rt = None  # float32 [K, N]: row j is channel j's residual R[:, j]
            if self.residual is not None:
                # Every row of the host store, decoded by the CPU op (the
                # Python reference unpacks bit by bit in int64: seconds per model).
                every = torch.arange(self.in_features, dtype=torch.int64)
                rt = ops.residual_gather(self.residual, self.residual_scales.cpu(), every,
                                         self.residual_bits).to(w.device)
            self._dense_cache = (w, rt)
        return self._dense_cache

    def _forward_dense(self, x: Tensor, k: int) -> Tensor:
        """The same per-token result as the ops, computed with BLAS: ``x @
        W_hat^T`` plus each row's ``sum_{j in S} x[j] R[:, j]``. Used by
        evaluation, where thousands of tokens per pass make a GEMM far faster
        than per-token decode; the equality with the op path is tested.

        The compensation reads only the selected rows of ``R^T``: ``k`` of
        ``K`` channels per token is a sparse product, so it is one
        ``embedding_bag`` (a weighted sum of ``k`` rows per token) rather than
        a dense ``(x * mask) @ R^T`` that multiplies ``K - k`` zeros per row;
        the static policy, one channel set for all rows, is a ``[rows, k] x
        [k, N]`` GEMM. Same sums, in another order (float32 rounding only)."""
        w, rt = self.dense_weights()
        x2d = x.reshape(-1, self.in_features).float()
        y = x2d @ w.t()
        if k > 0:
            if self.policy == "static":
                channels = self._static_channels(k).to(x2d.device)
                y.addmm_(x2d.index_select(1, channels), rt.index_select(0, channels))
            else:
                channels = self.select_channels(x2d)
                if channels is None:
                    channels = ops.outlier_select(x2d, k)
                y += F.embedding_bag(channels, rt, per_sample_weights=x2d.gather(1, channels),
                                     mode="sum")
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def clear_dense_cache(self) -> None:
        self._dense_cache = None


def sharded_outlier_select(x2d: Tensor, k: int, shards: int) -> Tensor:
    """Per-shard top-k: split the channels of ``x2d [rows, K]`` into ``shards``
    contiguous equal slices and take the ``ceil(k / shards)`` largest ``|x|`` of
    each (:func:`qdec.ops.outlier_select` per slice), as global indices int64
    ``[rows, shards * ceil(k / shards)]``, slice by slice. ``k = 0`` gives no
    channels."""
    K = x2d.shape[-1]
    if shards < 1 or K % shards:
        raise ValueError(f"shards must be >= 1 and divide K={K}, got {shards}")
    local = -(-k // shards)
    width = K // shards
    if local > width:
        raise ValueError(f"ceil(k / shards) = {local} exceeds the shard width {width}")
    parts = [ops.outlier_select(x2d[:, i * width:(i + 1) * width].contiguous(), local) + i * width
             for i in range(shards)]
    return torch.cat(parts, dim=-1)


def place_residual(residual: Tensor) -> Tensor:
    """The residual store's home: host memory, pinned when a CUDA device is
    present so the CUDA kernel can read it zero-copy; plain memory otherwise."""
    residual = residual.detach().to("cpu").contiguous()
    if torch.cuda.is_available() and not residual.is_pinned():
        residual = residual.pin_memory()
    return residual
