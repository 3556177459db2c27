"""What a step costs on this device, and how much prefill fits in a step under a target time.

A step's time is modelled as ``c0 + c1 * tokens + c2 * attended``: ``tokens`` the
query tokens of the step (the linears, and per-row work such as sampling, since a
decoding sequence is one token), ``attended`` the query-key pairs attention reads
(causal within a chunk). There is no separate per-sequence term: in decode steps it
moves with the token count, so a fit could put the whole decode cost on it and then
price every prefill chunk as a whole extra decode batch. The coefficients are fitted
to the engine's own step timings (least squares, none negative), so the budget
follows the machine and the model without configuration.
"""

from __future__ import annotations

import itertools
from collections import deque
from typing import NamedTuple

import numpy as np

# Steps remembered for the fit: enough to span decode-only and prefill steps, few
# enough that the fit follows a machine whose load changes.
HISTORY = 256
# The fit is trusted after this many steps, with prefill sizes this far apart.
MIN_SAMPLES = 8
MIN_TOKEN_SPREAD = 64
REFIT_EVERY = 8  # steps between refits: a refit costs well under a millisecond
# A step that has prefill work prefills at least this many tokens, whatever the
# model predicts, so waiting requests progress even when decode alone fills the target.
MIN_PREFILL_TOKENS = 32
# A step with decodes and prefill aims at no more than this many times the cheapest
# step (one decode token), so a stream's inter-token latency under load stays a small
# multiple of what it is alone, on any device and under any load the fit has seen.
# Not while requests wait for admission: then queued work would starve (throughput
# fell with concurrency), so the target alone bounds the step.
BASE_STEP_MULTIPLE = 2.5
# While sequences decode, prefill rides one step in this many, with the prefill time
# of all of them: the other steps are decode only, so most of a stream's gaps are a
# decode step (the inter-token latency p50 follows the decode batch, not the
# newcomers' prefill), while prefill gets as much time as when it rode every step.
PREFILL_EVERY = 3
# Prefill may always take as long as the step's decodes, so that with many streams
# decoding, newcomers still get their first tokens (and throughput does not fall).
PREFILL_SHARE_OF_DECODE = 1.0

# Feature scales keep the least-squares problem well conditioned.
_SCALES = np.array([1.0, 1e-3, 1e-6])


class StepShape(NamedTuple):
    """The work of one step, in the terms the cost model prices."""

    tokens: int = 0
    attended: float = 0.0

    def plus(self, context: int, num_tokens: int) -> StepShape:
        """This step with ``num_tokens`` more of a sequence that has ``context`` computed."""
        return StepShape(
            self.tokens + num_tokens,
            self.attended + num_tokens * (context + (num_tokens + 1) / 2),
        )

    @property
    def features(self) -> np.ndarray:
        """The model's feature row (scaled)."""
        return np.array([1.0, self.tokens, self.attended]) * _SCALES


class StepCostModel:
    """Predicts a step's seconds from its ``StepShape``; learns from ``observe``.

    ``coefficients`` (seconds for ``c0, c1, c2`` of the module's model) fixes
    the model: it is ready at once and ``observe`` changes nothing, which is how
    tests give the scheduler known costs.
    """

    def __init__(self, coefficients: tuple[float, float, float] | None = None) -> None:
        self._rows: deque[np.ndarray] = deque(maxlen=HISTORY)
        self._times: deque[float] = deque(maxlen=HISTORY)
        self._fixed = coefficients is not None
        self._coef: np.ndarray | None = None
        if coefficients is not None:
            coef = np.asarray(coefficients, dtype=float)
            if coef.shape != (3,) or not np.all(np.isfinite(coef)) or np.any(coef < 0):
                raise ValueError(
                    f"coefficients must be three finite numbers >= 0, got {coefficients!r}"
                )
            self._coef = coef / _SCALES
        self._since_fit = 0

    @property
    def ready(self) -> bool:
        """Whether predictions can be trusted (fixed, or fitted to enough steps)."""
        return self._coef is not None

    def predict(self, shape: StepShape) -> float:
        """Predicted seconds of a step of ``shape`` (only when ``ready``)."""
        if self._coef is None:
            raise RuntimeError("the step cost model has not seen enough steps yet")
        return float(shape.features @ self._coef)

    def observe(self, shape: StepShape, seconds: float) -> None:
        """Record a step's measured time; refit now and then."""
        if self._fixed or not np.isfinite(seconds) or seconds <= 0:
            return
        self._rows.append(shape.features)
        self._times.append(seconds)
        self._since_fit += 1
        if self._since_fit >= REFIT_EVERY and self._enough():
            self._coef = _fit_nonnegative(np.array(self._rows), np.array(self._times))
            self._since_fit = 0

    def _enough(self) -> bool:
        if len(self._rows) < MIN_SAMPLES:
            return False
        tokens = [row[1] / _SCALES[1] for row in self._rows]
        return max(tokens) - min(tokens) >= MIN_TOKEN_SPREAD


def _fit_nonnegative(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares of the relative error with no negative coefficient: the best of
    the fits over each subset of features whose solution is non-negative (three
    features: 7 subsets). A negative cost would let a bigger step look cheaper, which
    nothing on a device is. Relative error, because an absolute one lets a few long
    prefill steps decide the fit, and the limit is a few times a short decode step."""
    x, y = x / y[:, None], np.ones_like(y)
    best, best_err = np.zeros(x.shape[1]), float(np.sum(y * y))
    for size in range(1, x.shape[1] + 1):
        for cols in itertools.combinations(range(x.shape[1]), size):
            sub = x[:, cols]
            coef, *_ = np.linalg.lstsq(sub, y, rcond=None)
            if np.any(coef < 0):
                continue
            err = float(np.sum((sub @ coef - y) ** 2))
            if err < best_err:
                best = np.zeros(x.shape[1])
                best[list(cols)] = coef
                best_err = err
    return best


class StepBudget:
    """One step's room, filled by the scheduler: decode first, then prefill chunks.

    ``max_tokens`` is the hard cap on a step's tokens. With a ``target_s`` and a
    ready ``cost`` model, a prefill chunk gets as many tokens as keep the predicted
    step time within ``step_limit`` (at least ``MIN_PREFILL_TOKENS`` for the step's
    first prefill, so prefill never starves), in one step of every ``PREFILL_EVERY``
    while sequences decode (``prefill_held`` in the others); otherwise the cap alone
    decides, as a fixed budget does.
    """

    def __init__(
        self, max_tokens: int, target_s: float | None = None, cost: StepCostModel | None = None
    ) -> None:
        if target_s is not None and not target_s > 0:
            raise ValueError(f"the step time target must be positive, got {target_s!r}")
        self.max_tokens, self.target_s = max_tokens, target_s
        self.cost = cost if cost is not None or target_s is None else StepCostModel()
        self.shape = StepShape()
        self.decode_only_steps = PREFILL_EVERY - 1  # the first step with decodes may prefill
        self.start()

    def start(self, waiting: int = 0) -> None:
        """Begin a new step: nothing in it yet; ``waiting`` requests queued for admission."""
        if self.shape.tokens:  # the step before: how many decode-only steps in a row
            held = self.decode_shape.tokens and not self.prefilled
            self.decode_only_steps = self.decode_only_steps + 1 if held else 0
        self.tokens_left = self.max_tokens
        self.shape = self.decode_shape = StepShape()
        self.prefilled = False
        self.waiting = waiting

    @property
    def adaptive(self) -> bool:
        """Whether this step's prefill follows the cost model (else the cap alone)."""
        return self.target_s is not None and self.cost is not None and self.cost.ready

    def take(self, context: int, num_tokens: int, prefill: bool) -> None:
        """Put ``num_tokens`` of a sequence with ``context`` computed into the step."""
        if num_tokens < 0 or num_tokens > self.tokens_left:
            raise ValueError(f"cannot take {num_tokens} tokens with {self.tokens_left} left")
        self.tokens_left -= num_tokens
        self.shape = self.shape.plus(context, num_tokens)
        if not prefill:
            self.decode_shape = self.decode_shape.plus(context, num_tokens)
        self.prefilled = self.prefilled or prefill

    def step_limit(self) -> float:
        """The seconds prefill may fill a step to (only when ``adaptive``).

        Without decodes, the target. With decodes, the target, or ``BASE_STEP_MULTIPLE``
        cheapest steps when that is less and no request waits for admission; never
        less than leaves prefill ``PREFILL_SHARE_OF_DECODE`` of the decodes' time; and
        that prefill time ``PREFILL_EVERY`` times over, as prefill rides one step in
        ``PREFILL_EVERY``."""
        if not self.decode_shape.tokens:
            return self.target_s
        cost = self.cost
        decode = cost.predict(self.decode_shape)
        limit = self.target_s
        if not self.waiting:
            limit = min(limit, BASE_STEP_MULTIPLE * cost.predict(StepShape().plus(0, 1)))
        limit = max(limit, (1 + PREFILL_SHARE_OF_DECODE) * decode)
        return decode + PREFILL_EVERY * (limit - decode)

    @property
    def prefill_held(self) -> bool:
        """Whether this step stays decode only: sequences decode in it, and fewer than
        ``PREFILL_EVERY - 1`` decode-only steps came since prefill last ran."""
        return bool(self.decode_shape.tokens) and self.decode_only_steps < PREFILL_EVERY - 1

    def prefill_room(self, context: int, wanted: int) -> int:
        """How many of ``wanted`` prefill tokens, after ``context`` computed ones, fit."""
        cap = max(0, min(wanted, self.tokens_left))
        if cap == 0 or not self.adaptive:
            return cap
        if self.prefill_held:
            return 0
        limit = self.step_limit()
        low, high = 0, cap  # the largest chunk predicted within the limit
        while low < high:
            mid = (low + high + 1) // 2
            if self.cost.predict(self.shape.plus(context, mid)) <= limit:
                low = mid
            else:
                high = mid - 1
        if not self.prefilled:
            low = max(low, min(cap, MIN_PREFILL_TOKENS))
        return low
