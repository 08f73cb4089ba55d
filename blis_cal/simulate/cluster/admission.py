"""Admission policies: the gate before routing. A rejected request never reaches an instance.

token-bucket is BLIS's: the bucket starts full at `capacity` tokens, refills continuously at `refill_rate`
tokens per second of simulated time (capped at capacity), and a request costs its prompt length (prefix
included); it is admitted if the bucket holds at least that many tokens. The level is kept as an exact
fraction so that admitting "exactly what the budget allows" is not at the mercy of float rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING

from blis_cal.errors import ConfigError
from blis_cal.registry import Registry

if TYPE_CHECKING:
    from blis_cal.simulate.request import SimRequest


@dataclass(frozen=True)
class AdmissionParams:
    """Parameters any admission policy may read (only token-bucket uses them today)."""

    token_bucket_capacity: float = 10000.0
    token_bucket_refill_rate: float = 1000.0  # tokens per simulated second

    def __post_init__(self) -> None:
        for name in ("token_bucket_capacity", "token_bucket_refill_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ConfigError(f"admission.{name} must be a finite number, got {value!r}")
        if self.token_bucket_capacity <= 0:
            raise ConfigError(
                f"admission.token_bucket_capacity must be > 0, got {self.token_bucket_capacity}"
            )
        if self.token_bucket_refill_rate < 0:
            raise ConfigError(
                f"admission.token_bucket_refill_rate must be >= 0, got {self.token_bucket_refill_rate}"
            )


class AdmissionPolicy:
    def __init__(self, params: AdmissionParams) -> None:
        self.params = params

    def admit(self, req: SimRequest, now_us: int) -> bool:
        raise NotImplementedError


admission_policies: Registry[type[AdmissionPolicy]] = Registry("admission policy")


@admission_policies.register("always-admit")
class AlwaysAdmit(AdmissionPolicy):
    def admit(self, req: SimRequest, now_us: int) -> bool:
        return True


@admission_policies.register("reject-all")
class RejectAll(AdmissionPolicy):
    def admit(self, req: SimRequest, now_us: int) -> bool:
        return False


@admission_policies.register("token-bucket")
class TokenBucket(AdmissionPolicy):
    def __init__(self, params: AdmissionParams) -> None:
        super().__init__(params)
        # str() first: the decimal the user wrote, not its binary float approximation.
        self.capacity = Fraction(str(params.token_bucket_capacity))
        self.rate_per_us = Fraction(str(params.token_bucket_refill_rate)) / 1_000_000
        self.tokens = self.capacity
        self.last_us: int | None = None

    def admit(self, req: SimRequest, now_us: int) -> bool:
        if self.last_us is not None and now_us > self.last_us:
            self.tokens = min(self.capacity, self.tokens + (now_us - self.last_us) * self.rate_per_us)
        self.last_us = now_us if self.last_us is None else max(self.last_us, now_us)
        cost = req.input_len
        if self.tokens >= cost:
            self.tokens -= cost
            return True
        return False
