"""A few more bits per dimension for the last re-ranking of a compressed feature database.

The compressed index kinds re-rank their candidates from 8-bit scalar codes (``Refine(SQ8)``). At 10M clustered
vectors that code, not the candidates, is what limits recall: the exact top 10 is among the candidates 98 % of the
time, but the 8-bit scores keep only ~94 % of it (README, "Feature database"). A :class:`ResidualCodec` stores
``bits`` more bits per dimension of what the 8-bit code missed (the residual: a vector minus its reconstruction from
the index), so the database can re-score the few best results of the index from a finer reconstruction: one extra
bit halves the error of every coordinate, as a 9-bit code would, for 1/8 of the 8-bit code's size.

Each dimension has its own uniform quantiser over the range its residuals take in a training sample (for a
min/max 8-bit code, half a step either side). A value outside the range gets the nearest end level.
"""

from __future__ import annotations

import numpy as np

from animeai.online.errors import FeatureDBError

MAX_BITS = 8


class ResidualCodec:
    """``bits`` bits per dimension of a residual vector: ``encode`` packs them into ``code_size`` bytes a vector,
    ``decode`` gives back the centre of each coordinate's cell."""

    def __init__(self, dim: int, bits: int, ranges: np.ndarray | None = None):
        if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= MAX_BITS:
            raise ValueError(f"residual bits must be an integer from 1 to {MAX_BITS}, got {bits!r}")
        self.dim, self.bits = dim, bits
        self.levels = 1 << bits
        self.code_size = (dim * bits + 7) // 8
        self._lo = self._step = None
        if ranges is not None:
            self._set_ranges(np.asarray(ranges))

    def _set_ranges(self, ranges: np.ndarray) -> None:
        if ranges.shape != (2, self.dim) or ranges.dtype != np.float32:
            raise FeatureDBError(f"residual ranges of {ranges.dtype} {ranges.shape}, expected float32 (2, {self.dim})")
        lo, hi = ranges
        if not (np.isfinite(ranges).all() and (hi >= lo).all()):
            raise FeatureDBError("residual ranges must be finite, each low end at most its high end")
        self._lo, self._hi = lo.copy(), hi.copy()
        self._step = (hi - lo) / self.levels  # 0 for a dimension without spread: decodes to its one value
        self._centre0 = lo + 0.5 * self._step  # the first cell's centre

    def ranges(self) -> np.ndarray:
        """``(2, dim)`` float32: the low and high ends per dimension (learnt by :meth:`train`, saved with the codes)."""
        return np.stack([self._lo, self._hi]).astype(np.float32)

    def train(self, residuals: np.ndarray) -> None:
        r = np.asarray(residuals, np.float32)
        if r.ndim != 2 or r.shape[1] != self.dim or len(r) == 0:
            raise ValueError(f"training residuals of shape {tuple(r.shape)}, expected (n > 0, {self.dim})")
        self._set_ranges(np.stack([r.min(axis=0), r.max(axis=0)]))

    def encode(self, residuals: np.ndarray) -> np.ndarray:
        """``(n, code_size)`` uint8: the cell of every coordinate, ``bits`` bits each, most significant first."""
        r = np.asarray(residuals, np.float32)
        step = np.where(self._step > 0, self._step, 1.0)
        cells = np.clip(np.floor((r - self._lo) / step), 0, self.levels - 1).astype(np.uint8)
        if self.bits == 8:
            return cells
        planes = (cells[:, :, None] >> np.arange(self.bits - 1, -1, -1, dtype=np.uint8)) & 1
        return np.packbits(planes.reshape(len(r), -1), axis=1)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """``(n, dim)`` float32: each coordinate's cell centre."""
        if self.bits == 8:
            cells = codes.astype(np.float32)
        else:
            planes = np.unpackbits(codes, axis=1, count=self.dim * self.bits).reshape(len(codes), self.dim, self.bits)
            cells = planes[:, :, 0].astype(np.float32)
            for b in range(1, self.bits):
                cells *= 2
                cells += planes[:, :, b]
        cells *= self._step
        cells += self._centre0
        return cells
