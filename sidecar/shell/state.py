"""Runtime weight overrides (`PUT /admin/routes/{route}/weights`) and their file in `state_dir`.

What this module owns:

- `Overrides`: per route, the full weights an operator set and the route's fingerprint at
  that time. An override applies only while the route's fingerprint is the same: a reload
  that changes the route (its split, match, or a backend it uses) clears it (docs/reference/admin-api.md#weights), and
  so does a restart whose config changed the route since (dropped and logged).
- Applying: an override becomes a new `core.split.Split` in `runtime.splits[route]`, its
  names in the route's backend order (the proxy indexes `route.backends` by the pick).
- Persistence: with `state_dir`, `state.json` there is rewritten whenever the overrides
  change: written to a temporary file (mkstemp: a random name, O_EXCL, so never through a
  planted symlink), fsynced, renamed over the old one (atomic on POSIX), the folder fsynced
  (shell/files.py); in a worker thread, one write at a time, the newest snapshot last.
  The file: `{"format": 1, "weights": {route: {"fingerprint": fp, "weights": {b: w}}}}`.
  `state_dir` is read once at start; a reload that changes it warns (restart to apply).

Imports: stdlib, orjson, sidecar.config, sidecar.core, sidecar.shell.runtime/files.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import orjson

from sidecar.config.plan import Plan, RoutePlan
from sidecar.core.split import Split
from sidecar.shell.files import Snapshots
from sidecar.shell.runtime import Runtime

log = logging.getLogger("sidecar.state")

STATE_FILE: Final = "state.json"
FORMAT: Final = 1


class InvalidWeights(ValueError):
    """A weights body the admin API refuses with 400; the message says why."""


@dataclass(frozen=True, slots=True)
class Override:
    fingerprint: str                 # the route's fingerprint when the override was set
    weights: Mapping[str, float]     # every backend of the route


def merge_weights(route: RoutePlan, current: Mapping[str, float], body: Any) -> dict[str, float]:
    """Validate a partial `{backend: weight}` body against a route; the others keep `current`.

    Raises InvalidWeights for: not an object, an empty object, an unknown backend, a weight
    that is not a finite number (booleans included), a negative weight, or all-zero weights.
    """
    if not isinstance(body, dict) or not body:
        raise InvalidWeights('the body must be a JSON object of backend weights, e.g. {"stable": 0, "canary": 100}')
    known = ", ".join(route.backends)
    merged = dict(current)
    for name, weight in body.items():
        if name not in route.backends:
            raise InvalidWeights(f"unknown backend {name!r} for route {route.name!r} (known: {known})")
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
            raise InvalidWeights(f"weight of {name!r} must be a number, got {weight!r}")
        if weight < 0:
            raise InvalidWeights(f"weight of {name!r} must be 0 or more, got {weight!r}")
        merged[name] = float(weight)
    total = sum(merged.values())
    if total <= 0:
        raise InvalidWeights("weights must not all be 0")
    if not math.isfinite(total):
        raise InvalidWeights("weights are too large: their sum must be a finite number")
    return merged


def split_of(route: RoutePlan, weights: Mapping[str, float]) -> Split:
    return Split([(b, weights[b]) for b in route.backends])


class Overrides:
    """The live overrides; `apply` puts them into a Runtime, `save` persists them."""

    def __init__(self, state_dir: Path | None) -> None:
        self.state_dir = state_dir
        self.by_route: dict[str, Override] = {}
        self._snapshots = Snapshots()

    @property
    def path(self) -> Path | None:
        return self.state_dir / STATE_FILE if self.state_dir is not None else None

    def weights_of(self, route: RoutePlan) -> dict[str, float]:
        """The weights a route uses now: its override's, else the config's."""
        o = self.by_route.get(route.name)
        if o is not None and o.fingerprint == route.fingerprint:
            return dict(o.weights)
        return dict(zip(route.split.names, route.split.weights, strict=True))

    def set(self, runtime: Runtime, route: RoutePlan, weights: Mapping[str, float]) -> None:
        self.by_route[route.name] = Override(route.fingerprint, dict(weights))
        runtime.splits[route.name] = split_of(route, weights)
        self._snapshots.changed()

    def clear(self, runtime: Runtime, route: RoutePlan) -> bool:
        if self.by_route.pop(route.name, None) is None:
            return False
        runtime.splits[route.name] = route.split
        self._snapshots.changed()
        return True

    def apply(self, runtime: Runtime, why: str) -> list[str]:
        """Put the overrides into `runtime`; drop (and return) those whose route changed or went."""
        dropped = []
        for name, o in list(self.by_route.items()):
            route = runtime.plan.routes_by_name.get(name)
            if route is None or route.fingerprint != o.fingerprint:
                del self.by_route[name]
                dropped.append(name)
                log.warning("weight override of route %s dropped (%s): the route %s", name, why,
                            "is gone" if route is None else "changed")
                continue
            runtime.splits[name] = split_of(route, o.weights)
        if dropped:
            self._snapshots.changed()
        return dropped

    # -- persistence --------------------------------------------------------------------------

    def load(self, plan: Plan) -> None:
        """Read state.json (blocking: call it through asyncio.to_thread at start)."""
        path = self.path
        if path is None or not path.exists():
            return
        try:
            doc = orjson.loads(path.read_bytes())
            entries = doc["weights"] if doc.get("format") == FORMAT else None
            if not isinstance(entries, dict):
                raise ValueError(f"unknown state format {doc.get('format')!r}")
            for name, entry in entries.items():
                route = plan.routes_by_name.get(name)
                weights = {str(k): float(v) for k, v in entry["weights"].items()}
                if route is None or set(weights) != set(route.backends) or sum(weights.values()) <= 0 \
                        or min(weights.values()) < 0:
                    # apply() logs fingerprint changes; this one is a route that no longer fits
                    log.warning("state: weight override of route %s dropped: the route is gone or changed", name)
                    self._snapshots.changed()
                    continue
                self.by_route[name] = Override(str(entry["fingerprint"]), weights)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.error("state: cannot use %s (%s); starting without overrides", path, e)
            self.by_route.clear()

    @property
    def dirty(self) -> bool:
        return self._snapshots.dirty

    async def save(self) -> bool:
        """Write the overrides if they changed since the last write (atomic, off the loop).

        False when the file could not be written (logged; the overrides still apply in memory).
        """
        path = self.path
        try:
            await self._snapshots.save(path, self._render)
        except OSError as e:
            log.error("state: cannot write %s: %s (overrides apply, but will not survive a restart)", path, e)
            return False
        return True

    def _render(self) -> bytes:
        doc = {"format": FORMAT, "weights": {
            name: {"fingerprint": o.fingerprint, "weights": dict(o.weights)}
            for name, o in sorted(self.by_route.items())}}
        return orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)


def resolve_state_dir(state_dir: str | None, config_path: Path | None) -> Path | None:
    """`state_dir` as a path; relative to the config file's folder (docs/reference/configuration.md)."""
    if not state_dir:
        return None
    p = Path(state_dir)
    if p.is_absolute():
        return p
    return (config_path.parent if config_path is not None else Path.cwd()) / p
