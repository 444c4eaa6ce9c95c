"""COACH context-aware cache: per-label semantic centres, task separability, early exit and bit relief.

A stage's activation is global-average-pooled into a task feature ``F`` (:meth:`SemanticCache.feature`:
mean over the spatial dims of ``[N, C, H, W]``, over the tokens of ``[N, T, C]``; ``[N, C]`` is used as is).
The cache keeps one semantic centre per label, warmed on the calibration set and updated as a running
mean (Eq. 7: ``T_j = (m_j T_j + F) / (m_j + 1)``). With ``max_count`` the count saturates, so the centre
becomes an exponential average that follows the current context (temporal locality) instead of freezing.

Similarities ``t_j`` are cosine similarities clipped to ``[0, 1]`` (labels without a centre score 0), and
the task separability is Eq. 9, ``S = ||T||_2 (t_H - t_SH) t_H / t_SH`` (``t_H``, ``t_SH``: the highest and
second-highest similarity). When ``S > threshold`` (``S_ext``) the frame exits early with ``argmax_j t_j``.

:meth:`SemanticCache.calibrate_threshold` picks the smallest ``S_ext`` whose early exits keep the accuracy
loss on a calibration set within a floor. It scans thresholds from the most separable frame down and stops
at the first threshold that breaks the floor, so every larger threshold is within the floor as well.

Bit relief (:meth:`SemanticCache.bits_relief`), a conservative reading of COACH's ``S_adj`` thresholds: only
a frame above the exit threshold (one the cache could answer on its own within the floor) may drop 1 bit
below the calibrated ``Q_r``, and one above twice the threshold 2 bits. Never more, never without a
calibrated threshold, never below the codec's 2 bits (:meth:`relieved_min_bits`). On the digits model a
looser rule (1 bit from half the threshold) lost 1.1 % accuracy on held-out frames; this one adds none.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["MIN_CODEC_BITS", "ExitDecision", "SemanticCache", "separability"]

MIN_CODEC_BITS = 2
_EPS = 1e-12

ExitDecision = tuple[bool, int | None, float]


def separability(t: np.ndarray) -> np.ndarray | float:
    """Eq. 9 for one similarity vector ``[K]`` (a float) or a batch ``[N, K]`` (an array)."""
    arr = np.asarray(t, dtype=np.float64)
    rows = np.atleast_2d(arr)
    if rows.shape[-1] < 2:
        out = np.full(rows.shape[0], math.inf)
    else:
        top2 = -np.sort(-rows, axis=1)[:, :2]
        t_h, t_sh = top2[:, 0], top2[:, 1]
        out = np.linalg.norm(rows, axis=1) * (t_h - t_sh) * t_h / np.maximum(t_sh, _EPS)
    return float(out[0]) if arr.ndim == 1 else out


class SemanticCache:
    """Per-label semantic centres with task separability, early exit and bit relief."""

    def __init__(self, num_labels: int, dim: int, *, threshold: float = math.inf,
                 max_count: int | None = None) -> None:
        if num_labels < 2 or dim < 1:
            raise ValueError("a semantic cache needs >= 2 labels and dim >= 1")
        if max_count is not None and max_count < 1:
            raise ValueError("max_count must be >= 1")
        self.num_labels = int(num_labels)
        self.dim = int(dim)
        self.threshold = float(threshold)
        self.max_count = max_count
        self.centres = np.zeros((num_labels, dim))
        self.counts = np.zeros(num_labels, dtype=np.int64)

    @staticmethod
    def feature(activation: np.ndarray) -> np.ndarray:
        """Global-average-pool an activation: ``[N,C,H,W] -> [N,C]``, ``[N,T,C] -> [N,C]``, ``[N,C]`` as is."""
        a = np.asarray(activation, dtype=np.float64)
        if a.ndim >= 4:
            return a.reshape(a.shape[0], a.shape[1], -1).mean(axis=2)
        if a.ndim == 3:
            return a.mean(axis=1)
        if a.ndim in (1, 2):
            return a
        raise ValueError("a scalar activation has no feature")

    def update(self, feature: np.ndarray, label: int) -> None:
        """Fold one feature into its label's centre (Eq. 7, count capped at ``max_count``)."""
        f = self._vec(feature)
        j = int(label)
        m = int(self.counts[j]) if self.max_count is None else min(int(self.counts[j]), self.max_count)
        self.centres[j] = (m * self.centres[j] + f) / (m + 1)
        self.counts[j] += 1

    def warm(self, features: np.ndarray, labels: Sequence[int] | np.ndarray) -> None:
        """Warm the centres with a labelled calibration set (the plain mean, whatever ``max_count``)."""
        feats, labs = self._batch(features, labels)
        for j in np.unique(labs):
            sel = feats[labs == j]
            m = int(self.counts[j])
            self.centres[j] = (m * self.centres[j] + sel.sum(axis=0)) / (m + len(sel))
            self.counts[j] += len(sel)

    def similarities(self, feature: np.ndarray) -> np.ndarray:
        """Cosine similarity to every centre, clipped to [0, 1] (``[K]``, or ``[N, K]`` for a batch)."""
        f = np.asarray(feature, dtype=np.float64)
        rows = np.atleast_2d(f)
        if rows.shape[-1] != self.dim:
            raise ValueError(f"feature of dim {rows.shape[-1]}, cache dim {self.dim}")
        norms = np.linalg.norm(self.centres, axis=1)
        sims = rows @ self.centres.T / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True) * norms, _EPS)
        sims[:, self.counts == 0] = 0.0
        sims = np.clip(sims, 0.0, 1.0)
        return sims[0] if f.ndim == 1 else sims

    def separability(self, t: np.ndarray) -> np.ndarray | float:
        """Eq. 9 on similarities (see :func:`separability`)."""
        return separability(t)

    def decide(self, feature: np.ndarray) -> ExitDecision:
        """``(exit, label, S)``: exit early with the top label when ``S > threshold`` (label None otherwise)."""
        t = self.similarities(self._vec(feature))
        if int(np.count_nonzero(self.counts)) < 2:
            return False, None, 0.0
        s = float(separability(t))
        if s > self.threshold:
            return True, int(np.argmax(t)), s
        return False, None, s

    def calibrate_threshold(self, features: np.ndarray, labels: Sequence[int] | np.ndarray,
                            reference: Sequence[int] | np.ndarray | None = None, floor: float = 0.005, *,
                            warmed: bool = True) -> float:
        """Set and return the smallest ``S_ext`` whose early exits keep the accuracy loss within ``floor``.

        ``labels`` are the true labels; ``reference`` the full model's predictions (None: assume the full
        model is always right, a conservative choice). Loss = accuracy of the full model minus accuracy when
        frames above the threshold take the cache's label instead. ``warmed``: these very samples warmed the
        centres, so each is scored leave-one-out (against centres without it), which keeps the threshold
        honest for unseen frames.
        """
        feats, truth = self._batch(features, labels)
        ref = truth if reference is None else np.asarray(reference, dtype=np.int64).reshape(-1)
        n = truth.shape[0]
        if ref.shape[0] != n or n == 0:
            raise ValueError("features, labels and reference must have the same non-zero length")
        t = self.similarities(feats)
        if warmed:
            t = self._leave_one_out(feats, truth, t)
        s = np.asarray(separability(t))
        cached = np.argmax(t, axis=1)
        # exiting frame i changes correctness by (ref_i == y_i) - (cache_i == y_i)
        delta = ((ref == truth) & (cached != truth)).astype(np.int64)
        order = np.argsort(-s, kind="stable")
        threshold, loss = math.inf, 0
        i = 0
        while i < n:
            j = i  # frames with equal S exit together
            while j < n and s[order[j]] == s[order[i]]:
                loss += int(delta[order[j]])
                j += 1
            if loss / n > floor:
                break
            nxt = s[order[j]] if j < n else -math.inf
            threshold = float(nxt) if math.isfinite(nxt) else float(np.nextafter(s[order[i]], -math.inf))
            i = j
        self.threshold = threshold
        return threshold

    def bits_relief(self, s: float) -> int:
        """Bits the requirement may drop for separability ``s``: 0; 1 above ``S_ext``; 2 above ``2 S_ext``."""
        if not math.isfinite(self.threshold) or not s > 0:
            return 0
        if s > 2.0 * self.threshold:
            return 2
        return 1 if s > self.threshold else 0

    def relieved_min_bits(self, min_bits: int, s: float) -> int:
        """``Q_r`` for this frame: the calibrated floor lowered by :meth:`bits_relief`, never below 2 bits."""
        if min_bits >= 16:  # float16/float32 cuts are not relieved into integer quantization
            return int(min_bits)
        return max(MIN_CODEC_BITS, int(min_bits) - self.bits_relief(s))

    def _leave_one_out(self, feats: np.ndarray, labs: np.ndarray, t: np.ndarray) -> np.ndarray:
        """Similarities with each sample's own contribution removed from its label's centre."""
        m = self.counts[labs].astype(np.float64)
        if np.any(m < 1):
            raise ValueError("warmed=True but a sample's label has no centre")
        own = (m[:, None] * self.centres[labs] - feats) / np.maximum(m - 1, 1)[:, None]
        cos = np.sum(own * feats, axis=1) / np.maximum(
            np.linalg.norm(own, axis=1) * np.linalg.norm(feats, axis=1), _EPS)
        out = np.array(t, copy=True)
        out[np.arange(len(labs)), labs] = np.where(m > 1, np.clip(cos, 0.0, 1.0), 0.0)
        return out

    def _batch(self, features: np.ndarray, labels: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        feats = np.atleast_2d(np.asarray(features, dtype=np.float64))
        labs = np.asarray(labels, dtype=np.int64).reshape(-1)
        if feats.shape != (labs.shape[0], self.dim):
            raise ValueError(f"features {feats.shape} do not match {labs.shape[0]} labels of dim {self.dim}")
        if labs.size and (labs.min() < 0 or labs.max() >= self.num_labels):
            raise ValueError(f"labels must be in 0..{self.num_labels - 1}")
        return feats, labs

    def _vec(self, feature: np.ndarray) -> np.ndarray:
        f = np.asarray(feature, dtype=np.float64).reshape(-1)
        if f.shape[0] != self.dim:
            raise ValueError(f"feature of dim {f.shape[0]}, cache dim {self.dim}")
        return f
