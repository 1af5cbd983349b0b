"""A circuit breaker per upstream: stop sending after consecutive failures, then probe."""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable

from bridge.errors import RetriableUpstreamError, UpstreamUnavailableError

logger = logging.getLogger(__name__)

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


class CircuitState(enum.StrEnum):
    """Where a circuit breaker stands."""

    CLOSED = "closed"  # requests flow
    OPEN = "open"  # the upstream looks down: nothing is sent until the pause ends
    HALF_OPEN = "half-open"  # one probe is allowed through; its outcome closes or re-opens


class CircuitBreaker:
    """Stops sending to an upstream after consecutive failures, and lets one probe through later.

    A failure is a transport error or a 5xx answer; 429 and other answers prove the server is up.
    While the circuit is open, callers wait for the pause to end (if their retry budget allows)
    instead of each hammering the upstream; then one caller probes and the others wait for it.
    """

    def __init__(
        self,
        service: str,
        *,
        failures: int = 5,
        reset_after: float = 30.0,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.service = service
        self.failures = failures
        self.reset_after = reset_after
        self._clock = clock
        self._sleep = sleep
        self._state = CircuitState.CLOSED
        self._consecutive = 0
        self._opened_at = 0.0
        self._probing = False
        self._settled: asyncio.Event | None = None
        self.opened = 0  # how often the circuit opened, for tests and metrics

    @property
    def state(self) -> CircuitState:
        """The current state."""
        return self._state

    @staticmethod
    def counts_as_failure(exc: RetriableUpstreamError) -> bool:
        """Whether an error says the upstream is down (rather than busy)."""
        return exc.status is None or exc.status >= 500

    async def acquire(self, deadline: float) -> None:
        """Return when a request may be sent; raise UpstreamUnavailableError if not before ``deadline``."""
        while True:
            now = self._clock()
            if self._state is CircuitState.CLOSED:
                return
            if self._state is CircuitState.OPEN:
                resume = self._opened_at + self.reset_after
                if now >= resume:
                    self._half_open()
                    return
                if resume > deadline:
                    raise self._unavailable(resume - now)
                await self._sleep(resume - now)
                continue
            if not self._probing:
                self._probing = True
                return
            settled = self._settled
            if settled is None or now >= deadline:
                raise self._unavailable(0.0)
            try:
                await asyncio.wait_for(settled.wait(), timeout=deadline - now)
            except TimeoutError:
                raise self._unavailable(0.0) from None

    def _half_open(self) -> None:
        self._state = CircuitState.HALF_OPEN
        self._probing = True
        self._settled = asyncio.Event()
        logger.info("%s: circuit half-open, probing the upstream", self.service)

    def _settle(self) -> None:
        self._probing = False
        if self._settled is not None:
            self._settled.set()
            self._settled = None

    def _unavailable(self, pause: float) -> UpstreamUnavailableError:
        return UpstreamUnavailableError(
            f"{self.service}: the upstream failed {self._consecutive} times in a row; the bridge stopped "
            f"sending to it (circuit open, next try in {pause:.1f} s, beyond the retry budget)",
            service=self.service,
        )

    def success(self) -> None:
        """The upstream answered: close the circuit."""
        if self._state is not CircuitState.CLOSED:
            logger.info("%s: upstream answers again, circuit closed", self.service)
        self._state = CircuitState.CLOSED
        self._consecutive = 0
        self._settle()

    def failure(self) -> None:
        """The upstream failed one attempt: open the circuit after enough of them in a row."""
        self._consecutive += 1
        if self._state is CircuitState.HALF_OPEN or (
            self._state is CircuitState.CLOSED and self._consecutive >= self.failures
        ):
            self._state = CircuitState.OPEN
            self._opened_at = self._clock()
            self.opened += 1
            logger.warning(
                "%s: %d consecutive failures, circuit open: no request for %.1f s",
                self.service,
                self._consecutive,
                self.reset_after,
            )
            self._settle()

    def abandon(self) -> None:
        """A probe ended without an answer (cancelled): let another caller probe."""
        if self._state is CircuitState.HALF_OPEN:
            self._settle()
