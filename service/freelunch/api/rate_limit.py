"""Per-key rate limits over a sliding minute: requests, and tokens (prompt + max_tokens, counted
when the request is admitted, as OpenAI estimates them)."""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass

WINDOW_S = 60.0


class RateLimited(Exception):
    def __init__(self, message: str, retry_after: float, headers: dict[str, str]) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.headers = headers


@dataclass(slots=True)
class _Usage:
    events: deque  # (time, tokens)
    tokens: int = 0


class RateLimiter:
    def __init__(self, requests_per_minute: int | None, tokens_per_minute: int | None) -> None:
        self.rpm = requests_per_minute
        self.tpm = tokens_per_minute
        self._lock = threading.Lock()
        self._usage: dict[str, _Usage] = {}

    @property
    def enabled(self) -> bool:
        return self.rpm is not None or self.tpm is not None

    def acquire(self, bucket: str, tokens: int) -> dict[str, str]:
        """Count one request of `tokens` against `bucket`, or raise `RateLimited`. Returns the
        `x-ratelimit-*` headers to send."""
        now = time.monotonic()
        with self._lock:
            usage = self._usage.setdefault(bucket, _Usage(deque()))
            while usage.events and usage.events[0][0] <= now - WINDOW_S:
                usage.tokens -= usage.events.popleft()[1]
            if self.tpm is not None and tokens > self.tpm:
                raise ValueError(f"the request needs {tokens} tokens; the limit is {self.tpm} tokens per minute")
            over_requests = self.rpm is not None and len(usage.events) + 1 > self.rpm
            over_tokens = self.tpm is not None and usage.tokens + tokens > self.tpm
            if over_requests or over_tokens:
                retry = self._retry_after(usage, now, tokens, over_requests)
                what = "requests" if over_requests else "tokens"
                limit = self.rpm if over_requests else self.tpm
                used = len(usage.events) if over_requests else usage.tokens
                raise RateLimited(
                    f"Rate limit reached for {what} per minute: limit {limit}, used {used}, requested "
                    f"{1 if over_requests else tokens}. Retry in {retry} s.",
                    retry,
                    {"Retry-After": str(retry), **self._headers(usage, now)},
                )
            usage.events.append((now, tokens))
            usage.tokens += tokens
            return self._headers(usage, now)

    def _retry_after(self, usage: _Usage, now: float, tokens: int, by_requests: bool) -> int:
        """Seconds until enough of the window has expired for this request to pass."""
        freed, need = 0, 1 if by_requests else usage.tokens + tokens - self.tpm
        for t, n in usage.events:
            freed += 1 if by_requests else n
            if freed >= need:
                return max(1, math.ceil(t + WINDOW_S - now))
        return math.ceil(WINDOW_S)

    def _headers(self, usage: _Usage, now: float) -> dict[str, str]:
        headers = {}
        reset = f"{max(0.0, usage.events[0][0] + WINDOW_S - now):.0f}s" if usage.events else "0s"
        if self.rpm is not None:
            headers["x-ratelimit-limit-requests"] = str(self.rpm)
            headers["x-ratelimit-remaining-requests"] = str(max(0, self.rpm - len(usage.events)))
            headers["x-ratelimit-reset-requests"] = reset
        if self.tpm is not None:
            headers["x-ratelimit-limit-tokens"] = str(self.tpm)
            headers["x-ratelimit-remaining-tokens"] = str(max(0, self.tpm - usage.tokens))
            headers["x-ratelimit-reset-tokens"] = reset
        return headers
