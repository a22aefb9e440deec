"""Active health-check state of one endpoint: thresholds of consecutive results.

Like Envoy's unhealthy_threshold / healthy_threshold: a healthy endpoint turns unhealthy
after `unhealthy_after` failed checks in a row, an unhealthy one turns healthy after
`healthy_after` passed checks in a row; a result that agrees with the current state resets
the streak. The shell runs the checks (shell/health.py) and feeds each flip to
`EndpointSet.set_healthy` and the `backend_healthy` gauge.

Imports: standard library only.
"""

from __future__ import annotations


class HealthTracker:
    """Health of one endpoint from its active checks. O(1), no allocation."""

    __slots__ = ("_healthy", "_streak", "healthy_after", "unhealthy_after")

    def __init__(self, unhealthy_after: int, healthy_after: int, initially_healthy: bool = True) -> None:
        if unhealthy_after < 1 or healthy_after < 1:
            raise ValueError(
                "thresholds must be >= 1, got "
                f"unhealthy_after={unhealthy_after} healthy_after={healthy_after}"
            )
        self.unhealthy_after = unhealthy_after
        self.healthy_after = healthy_after
        self._healthy = initially_healthy
        # Invariant: results in a row that disagree with _healthy; always below the
        # threshold that would flip it.
        self._streak = 0

    def __repr__(self) -> str:
        state = "healthy" if self._healthy else "unhealthy"
        return f"<HealthTracker {state} streak={self._streak}>"

    @property
    def healthy(self) -> bool:
        return self._healthy

    def record(self, ok: bool) -> bool | None:
        """Count one check result; the new health when it flips, else None."""
        if ok == self._healthy:
            self._streak = 0
            return None
        self._streak += 1
        if self._streak < (self.healthy_after if ok else self.unhealthy_after):
            return None
        self._healthy = ok
        self._streak = 0
        return ok
