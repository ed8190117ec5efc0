"""Which samples each training step sees: random, fixed curricula, and an adaptive band.

Every ordering is a pure function of (seed, step, state), so a resumed run sees exactly the
batches an uninterrupted one would. Batches group samples of similar length, so little of a
batch is padding.

- random:        each epoch is a fresh seeded shuffle; within windows of GROUP batches the
                 samples are sorted by length and cut into batches, and the batches shuffled.
- easy-to-hard:  samples sorted by difficulty (the base model's mean loss on a sample's
                 target tokens), lowest first; lengths are grouped only inside windows of
                 GROUP batches, so the curriculum holds at that grain. Epochs repeat it.
- hard-to-easy:  the same, highest difficulty first.
- adaptive:      each step draws from the samples whose *current* loss lies between two
                 quantiles of all current losses (the band, default 0.3-0.8: neither already
                 learned nor out of reach, the learner's "zone of proximal development"),
                 picking a random run of similar-length samples inside the band. Losses
                 start as the difficulties; every `rescore_every` steps a seeded random
                 pool of `rescore_pool` samples is re-scored with the adapter (trainer.py).
"""

from __future__ import annotations

import numpy as np

from ..errors import UserError

ORDERS = ("random", "easy-to-hard", "hard-to-easy", "adaptive")
GROUP = 8  # batches per length-sorting window


class Order:
    def __init__(
        self,
        kind: str,
        lengths: np.ndarray,
        batch_size: int,
        seed: int = 0,
        difficulty: np.ndarray | None = None,
        band: tuple[float, float] = (0.3, 0.8),
    ):
        if kind not in ORDERS:
            raise UserError(f"--order must be one of {', '.join(ORDERS)}, got {kind!r}")
        if batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {batch_size}")
        if len(lengths) < batch_size:
            raise UserError(f"train.jsonl has {len(lengths)} samples, fewer than --batch-size {batch_size}")
        if kind != "random" and difficulty is None:
            raise ValueError(f"order {kind} needs per-sample difficulties")
        lo, hi = band
        if not 0.0 <= lo < hi <= 1.0:
            raise UserError(f"--band must be two quantiles 0 <= LO < HI <= 1, got {lo},{hi}")
        self.kind, self.lengths, self.batch_size, self.seed = kind, lengths, batch_size, seed
        self.band = band
        # Current per-sample losses (adaptive only): the state saved in checkpoints.
        self.scores = None if difficulty is None else np.asarray(difficulty, np.float64).copy()
        self._fixed = None
        if kind in ("easy-to-hard", "hard-to-easy"):
            by = np.argsort(self.scores, kind="stable")
            self._fixed = self._grouped(by if kind == "easy-to-hard" else by[::-1], shuffle=None)
        self._epoch_cache: tuple[int, list[np.ndarray]] | None = None

    @property
    def batches_per_epoch(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def batch(self, step: int) -> np.ndarray:
        """Sample indices of micro-batch number `step` (0-based)."""
        if self.kind == "adaptive":
            return self._adaptive(step)
        epoch, i = divmod(step, self.batches_per_epoch)
        if self._fixed is not None:
            return self._fixed[i]
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._epoch_cache = (epoch, self._grouped(rng.permutation(len(self.lengths)), rng))
        return self._epoch_cache[1][i]

    def in_band(self) -> np.ndarray:
        """Indices whose current loss lies inside the band's quantiles."""
        lo, hi = np.quantile(self.scores, self.band)
        return np.flatnonzero((self.scores >= lo) & (self.scores <= hi))

    def _grouped(self, order: np.ndarray, shuffle) -> list[np.ndarray]:
        window = self.batch_size * GROUP
        batches = []
        for start in range(0, len(order), window):
            chunk = order[start : start + window]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            batches += [chunk[j : j + self.batch_size] for j in range(0, len(chunk), self.batch_size)]
        if shuffle is not None:
            batches = [batches[k] for k in shuffle.permutation(len(batches))]
        return batches

    def _adaptive(self, step: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step])
        pool = self.in_band()
        if len(pool) < self.batch_size:
            # A narrow band on a small set: widen to the samples nearest the band's middle.
            mid = np.quantile(self.scores, sum(self.band) / 2)
            pool = np.argsort(np.abs(self.scores - mid), kind="stable")[: self.batch_size]
        pool = pool[np.argsort(self.lengths[pool], kind="stable")]
        start = rng.integers(0, len(pool) - self.batch_size + 1)
        return pool[start : start + self.batch_size]
