"""The admin API described as OpenAPI 3.1, served at `/admin/openapi.json` (docs/reference/admin-api.md).

Hand-written on purpose: the admin API is small and its shapes are the contract, so they are
written down here rather than inferred. `tests/shell/test_admin.py` checks that every route
registered on the admin app is documented here with its method. A new admin route adds its
path to `_paths`.

Imports: stdlib, sidecar (version).
"""

from __future__ import annotations

from typing import Any

from sidecar import __version__

_NUM_OR_NULL = {"type": ["number", "null"]}
_STR_OR_NULL = {"type": ["string", "null"]}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


# every operation, public ones included (shell/admin.py `_guard`, rule 1)
_HOST_ERR = {
    "421": _json(_ref("Error"), "no token is set, the listener is on loopback, and the Host header is not a "
                                "loopback name or address with the listener's port (type misdirected_request)"),
}
_ERR = {
    "401": _json(_ref("Error"), "a token is set and the request does not carry it"),
    **_HOST_ERR,
}
_STORE_ERR = _json(_ref("Error"), "with `fleet`: its store cannot be reached, so the change cannot reach "
                                  "every replica (type store_unavailable, Retry-After); nothing changed")
_MUTATING_ERR = {
    **_ERR,
    "403": _json(_ref("Error"), "the call comes from a web page of another origin (Origin, or Sec-Fetch-Site "
                                "cross-site/same-site), or no token is set and the admin listener is not on "
                                "loopback (type forbidden)"),
}
_ROUTE_PARAM = [{"name": "route", "in": "path", "required": True, "schema": {"type": "string"},
                 "description": "a route name from the config"}]

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object", "required": ["error"],
        "properties": {"error": {
            "type": "object", "required": ["type", "message"],
            "properties": {
                "type": {"type": "string", "examples": ["unauthorized", "forbidden", "not_found",
                                                        "invalid_weights", "invalid_config"]},
                "message": {"type": "string"},
                "errors": {"type": "array", "items": {"type": "string"},
                           "description": "invalid_config: every problem, each naming its place"},
                "route": {"type": "string"},
                "reload": _ref("ReloadResult"),
            }}},
    },
    "ReloadResult": {
        "type": "object",
        "properties": {
            "at": {"type": "number", "description": "Unix time (seconds)"},
            "reason": {"type": "string", "examples": ["admin", "SIGHUP", "file changed"]},
            "result": {"enum": ["ok", "unchanged", "error"]},
            "version": {"type": "string", "description": "the config version running after the reload"},
            "previous_version": {"type": "string"},
            "errors": {"type": "array", "items": {"type": "string"}},
            "warnings": {"type": "array", "items": {"type": "string"}},
            "cleared_overrides": {"type": "array", "items": {"type": "string"},
                                  "description": "routes whose weight override the reload cleared"},
        },
    },
    "Weights": {"type": "object", "additionalProperties": {"type": "number", "minimum": 0},
                "description": "backend name -> weight"},
    "Shares": {"type": "object", "additionalProperties": {"type": "number", "minimum": 0, "maximum": 1},
               "description": "backend name -> share of traffic from 0 to 1"},
    "RouteStatus": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "match": {"type": "object", "properties": {
                "path_prefix": {"type": "string"},
                "methods": {"type": ["array", "null"], "items": {"type": "string"}},
                "headers": {"type": "object", "additionalProperties": {"type": "string"}}}},
            "backends": {"type": "array", "items": {"type": "string"}},
            "weights": {**_ref("Weights"), "description": "as configured"},
            "override": {"type": "boolean", "description": "a runtime override is in force"},
            "override_weights": {"anyOf": [_ref("Weights"), {"type": "null"}]},
            "current_weights": {**_ref("Weights"), "description": "the weights in use: override or config"},
            "effective": {**_ref("Shares"), "description": "after overrides and exclusions (unavailable backends)"},
            "sticky": {**_STR_OR_NULL, "description": "the sticky key header"},
            "override_header": _STR_OR_NULL,
            "timeout_s": {"type": "number"},
            "rollout": {"anyOf": [_ref("Rollout"), {"type": "null"}],
                        "description": "the route's rollout with its last decision (last_decision instead of "
                                       "decisions); null without one"},
            "fingerprint": {"type": "string"},
            "persisted": {"type": "boolean", "description": "weights calls only: written to state_dir (or none set)"},
        },
    },
    "BackendStatus": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "url": {**_STR_OR_NULL, "description": "the backend's URL (passwords masked); null with several endpoints"},
            "endpoints": {"type": "array", "items": {"type": "object", "properties": {
                "url": {"type": "string"}, "inflight": {"type": "integer"}, "healthy": {"type": "boolean"},
                "ejected": {"type": "boolean"}}}},
            "inflight": {"type": "integer", "description": "tries and streams in flight, all endpoints"},
            "max_inflight": {"type": ["integer", "null"]},
            "max_connections": {"type": "integer"},
            "available": {"type": "boolean", "description": "may take a new try: circuit, bulkhead, endpoints"},
            "healthy": {"type": "boolean", "description": "some endpoint passes its health checks, not ejected"},
            "circuit": {"enum": ["closed", "half_open", "open"]},
            "p50_s": _NUM_OR_NULL, "p95_s": _NUM_OR_NULL, "p99_s": _NUM_OR_NULL,
            "error_rate": {**_NUM_OR_NULL, "description": "ratio 0 to 1, last requests over all routes"},
            "requests": {"type": "integer", "description": "requests behind the percentiles"},
            "health": {"enum": ["healthy", "unhealthy", "not checked", "ejected"],
                       "description": "healthy/unhealthy only with a health_check; without one, not checked (or "
                                      "ejected: outlier detection took out every endpoint): read recent_error_rate"},
            "health_checked": {"type": "boolean", "description": "the backend has a health_check"},
            "recent_error_rate": {**_NUM_OR_NULL, "description": "failed share (0 to 1) of its tries over the last "
                                                                 "minute, mirror copies included; null without tries"},
            "recent_tries": {"type": "integer", "description": "tries behind recent_error_rate"},
            "answers_total": {"type": "integer", "description": "answers it gave since start, all routes"},
            "answers_per_s": {**_NUM_OR_NULL, "description": "its answers per second over the last minute"},
            "mirrored_per_s": {**_NUM_OR_NULL, "description": "mirror copies it took per second, last minute"},
            "fingerprint": {"type": "string"},
            "model": {"anyOf": [_ref("Model"), {"type": "null"}],
                      "description": "the model version it serves (docs/registry.md); null: no `model` configured"},
        },
    },
    "Series": {"type": "array", "items": _NUM_OR_NULL,
               "description": "one value per point of `time` (null: none then)"},
    "History": {
        "type": "object",
        "description": "a point every every_s over the last keep_s; rates are per second over each point's "
                       "interval; p50/p99 interpolated within the histogram's buckets",
        "properties": {
            "every_s": {"type": "number"}, "keep_s": {"type": "number"},
            "time": {"type": "array", "items": {"type": "number"}, "description": "Unix time at each point's end"},
            "backends": {"type": "object", "additionalProperties": {"type": "object", "properties": {
                "answers_per_s": _ref("Series"),
                "codes_per_s": {"type": "object", "additionalProperties": _ref("Series"),
                                "description": "answers per second by status code"},
                "tries_per_s": _ref("Series"), "failed_tries_per_s": _ref("Series"),
                "mirrored_per_s": _ref("Series"), "p50_s": _ref("Series"), "p99_s": _ref("Series")}}},
            "routes": {"type": "object", "additionalProperties": {"type": "object", "properties": {
                "answers_per_s": _ref("Series"),
                "codes_per_s": {"type": "object", "additionalProperties": _ref("Series"),
                                "description": "what clients got, sidecar-made answers included"},
                "weights": {"type": "object", "additionalProperties": _ref("Series"),
                            "description": "effective share (0 to 1) per backend"}}}},
            "mirrors": {"type": "array", "items": {"type": "object", "properties": {
                "route": {"type": "string"}, "backend": {"type": "string"}, "agreement": _ref("Series")}}},
            "feedback": {"type": "array", "items": {"type": "object", "properties": {
                "route": {"type": "string"}, "backend": {"type": "string"}, "metric": {"type": "string"},
                "values": _ref("Series")}}},
        },
    },
    "Model": {
        "type": "object", "description": "a backend's model: version null while its alias is unresolved",
        "properties": {"name": {"type": "string"}, "version": _STR_OR_NULL,
                       "alias": {**_STR_OR_NULL, "description": "null for a static version"}},
    },
    "Status": {
        "type": "object",
        "description": "capabilities add top-level sections (e.g. mirrors, drift) through status providers",
        "properties": {
            "sidecar_version": {"type": "string"},
            "version": {"type": "string", "description": "config version (hash of the canonical config)"},
            "config_path": _STR_OR_NULL,
            "state_dir": _STR_OR_NULL,
            "started_at": {"type": "number", "description": "Unix time (seconds)"},
            "uptime_s": {"type": "number"},
            "ready": {"type": "boolean"},
            "draining": {"type": "boolean"},
            "inflight": {"type": "integer", "description": "client requests in flight"},
            "last_reload": {"anyOf": [_ref("ReloadResult"), {"type": "null"}]},
            "routes": {"type": "array", "items": _ref("RouteStatus")},
            "backends": {"type": "array", "items": _ref("BackendStatus")},
            "mirrors": {"description": "present when mirroring is available"},
            "drift": {"description": "present when monitoring is available"},
            "rollout_decisions": {"type": "array", "description": "recent rollout decisions (20 per route, newest "
                                                                  "first): route, time, step, canary_weight, "
                                                                  "verdict, action, state, reason"},
            "feedback": {"description": "per route with feedback and backend: model, metric, count, score_mean "
                                        "and per segment value (GET /admin/feedback has the counts)"},
            "registry": {"description": "present with a `registry`: kind, refreshed_at and aliases: "
                                        "[{model, alias, version (null: unresolved), error}]"},
        },
    },
}

_DECISION: dict[str, Any] = {
    "type": "object", "description": "docs/rollout.md#decisions",
    "properties": {
        "time": {"type": "number"}, "step": {"type": "integer"}, "weights": _ref("Weights"),
        "verdict": {"enum": ["pass", "fail", "inconclusive", "manual"]}, "action": {"type": "string"},
        "state": {"type": "string"}, "reason": {"type": "string"},
        "gates": {"type": "array", "items": {"type": "object", "properties": {
            "gate": {"type": "string"}, "value": _NUM_OR_NULL, "threshold": _NUM_OR_NULL,
            "samples": {"type": "object"}, "verdict": {"enum": ["pass", "fail", "inconclusive", "skipped"]},
            "reason": {"type": "string"}, "needs": {"type": "object"}}}},
        "canary_model": {"anyOf": [_ref("Model"), {"type": "null"}],
                         "description": "the canary's model when the decision was made"}}}
_SCHEMAS["Rollout"] = {
    "type": "object",
    "properties": {
        "route": {"type": "string"},
        "state": {"enum": ["progressing", "paused", "baking", "promoted", "rolled_back"]},
        "step": {"type": "integer", "description": "index in steps"},
        "steps": {"type": "array", "items": {"type": "integer"}},
        "canary": {"type": "string"}, "baseline": {"type": "string"},
        "reason": {"type": "string"}, "dry_run": {"type": "boolean"},
        "weights": {**_ref("Weights"), "description": "the weights the state holds (applied unless dry_run)"},
        "would_weights": {"anyOf": [_ref("Weights"), {"type": "null"}],
                          "description": "dry run: the weights it would have applied"},
        "started_at": {"type": "number"}, "step_started_at": {"type": "number"},
        "next_check_at": _NUM_OR_NULL, "key": {"type": "string"},
        "actions": {"type": "array", "items": {"type": "string"}, "description": "admin actions allowed now"},
        "decisions": {"type": "array", "items": _DECISION, "description": "the last 50, oldest first"},
        "last_decision": {"anyOf": [_DECISION, {"type": "null"}], "description": "in /admin/status only"},
        "canary_model": {"anyOf": [_ref("Model"), {"type": "null"}], "description": "the canary's model now"},
        "registry": {"anyOf": [{"type": "object", "properties": {
            "event": {"enum": ["promoted", "rolled_back"]}, "alias": {"type": "string"}, "time": {"type": "number"},
            "model": {"anyOf": [_ref("Model"), {"type": "null"}]},
            "writes": {"type": "array", "items": {"type": "object", "properties": {
                "operation": {"enum": ["set_alias", "set_tag"]}, "name": {"type": "string"},
                "version": {"type": "string"}, "key": {"type": "string"}, "value": {"type": "string"},
                "outcome": {"enum": ["pending", "written", "failed"]}, "tries": {"type": "integer"},
                "error": _STR_OR_NULL}}},
            "error": {**_STR_OR_NULL, "description": "what could not be written, and why"}}}, {"type": "null"}],
            "description": "with `registry.promote_alias`: the registry writes of the last promotion or rollback "
                           "(docs/registry.md); null before one"},
    },
}
_ROLLOUT_ACTION = [{"name": "action", "in": "path", "required": True,
                    "schema": {"enum": ["pause", "resume", "promote", "rollback", "restart"]}}]

_paths: dict[str, dict[str, Any]] = {
    "/healthz": {"get": {"summary": "liveness: 200 while the process serves", "security": [],
                         "responses": {"200": _json({"type": "object"}, "serving"), **_HOST_ERR}}},
    "/readyz": {"get": {"summary": "readiness: 200 once config is loaded and listeners are up", "security": [],
                        "responses": {"200": _json({"type": "object"}, "ready"),
                                      "503": _json({"type": "object"}, "starting or draining"), **_HOST_ERR}}},
    "/metrics": {"get": {"summary": "Prometheus metrics", "security": [],
                         "responses": {"200": {"description": "Prometheus text format",
                                               "content": {"text/plain": {"schema": {"type": "string"}}}},
                                       **_HOST_ERR}}},
    "/": {"get": {"summary": "the status page (self-contained HTML; it asks for the token when one is set)",
                  "security": [],
                  "responses": {"200": {"description": "HTML",
                                        "content": {"text/html": {"schema": {"type": "string"}}}},
                                **_HOST_ERR}}},
    "/admin/status": {"get": {"summary": "routes, effective weights, backends, reload state and capability sections",
                              "responses": {"200": _json(_ref("Status"), "status"), **_ERR}}},
    "/admin/config": {"get": {
        "summary": "the running config with its version; admin.token, URL passwords and values from "
                   "*TOKEN*/*SECRET*/*PASSWORD*/*KEY* variables masked as ***",
        "responses": {"200": _json({"type": "object", "properties": {
            "version": {"type": "string"}, "path": _STR_OR_NULL, "config": {"type": "object"}}}, "config"),
            **_ERR}}},
    "/admin/mirrors": {"get": {
        "summary": "per route and shadow: sent, dropped, outcome counts, rolling agreement, last disagreements "
                   "(redacted as the sample log is)",
        "responses": {"200": _json({"type": "object", "properties": {"mirrors": {"type": "array", "items": {
            "type": "object", "properties": {
                "route": {"type": "string"}, "backend": {"type": "string"}, "percent": {"type": "number"},
                "sent": {"type": "integer"}, "dropped": {"type": "integer"}, "inflight": {"type": "integer"},
                "outcomes": {"type": "object", "additionalProperties": {"type": "integer"}},
                "agreement": _NUM_OR_NULL,
                "disagreements": {"type": "array", "items": {"type": "object", "properties": {
                    "request_id": {"type": "string"}, "path": {"type": "string"}, "primary": {},
                    "shadow": {}, "at": {"type": "number"}}}}}}}}}, "mirrors"), **_ERR}}},
    "/admin/drift": {"get": {
        "summary": "per route, backend and feature, the last drift pass: test, statistic, p-value, PSI, "
                   "samples on each side, drifted",
        "responses": {"200": _json({"type": "object", "properties": {
            "routes": {"type": "array", "items": {"type": "object", "properties": {
                "route": {"type": "string"}, "reference": {}, "every_s": {"type": "number"},
                "sample": {"type": "number"}, "policy": {"type": "object"}, "computed_at": _NUM_OR_NULL,
                "dropped": {"type": "integer"},
                "features": {"type": "array", "items": {"type": "object", "properties": {
                    "route": {"type": "string"}, "backend": {"type": "string"}, "feature": {"type": "string"},
                    "kind": {"enum": ["numeric", "categorical"]}, "status": {"type": "string"},
                    "test": _STR_OR_NULL, "statistic": _NUM_OR_NULL, "p_value": _NUM_OR_NULL,
                    "psi": _NUM_OR_NULL, "n_ref": {"type": "integer"}, "n_cur": {"type": "integer"},
                    "drifted": {"type": ["boolean", "null"]}}}}}}},
            "last_pass_s": _NUM_OR_NULL}}, "drift"), **_ERR}}},
    "/admin/feedback": {"get": {
        "summary": "per route and backend: joined, unknown, expired, duplicate counts; the feedback metric over "
                   "the window, overall and per segment value (too_small under 30 items); the mean predicted score",
        "responses": {"200": _json({"type": "object", "properties": {
            "routes": {"type": "array", "items": {"type": "object", "properties": {
                "route": {"type": "string"}, "path": {"type": "string"},
                "metric": {"enum": ["accuracy", "mae", "rmse", "mean"]}, "window": {"type": "integer"},
                "keep_s": {"type": "number"}, "max_pending": {"type": "integer"},
                "pending": {"type": "integer"}, "pending_dropped": {"type": "integer"},
                "pending_expired": {"type": "integer"}, "pending_replaced": {"type": "integer"},
                "outcomes": {"type": "object", "additionalProperties": {"type": "integer"}},
                "captures_missed": {"type": "object", "additionalProperties": {"type": "integer"},
                                    "description": "by reason: streamed, error_status, queue_full"},
                "backends": {"type": "array", "items": {"type": "object", "properties": {
                    "backend": {"type": "string"}, "count": {"type": "integer"}, "metric": _NUM_OR_NULL,
                    "model": {"anyOf": [_ref("Model"), {"type": "null"}], "description": "docs/registry.md"},
                    "score_mean": _NUM_OR_NULL, "score_count": {"type": "integer"},
                    "outcomes": {"type": "object", "additionalProperties": {"type": "integer"}},
                    "missing_prediction": {"type": "integer"}, "id_too_long": {"type": "integer"},
                    "missing_segment": {"type": "object", "additionalProperties": {"type": "integer"}},
                    "segments": {"type": "array", "items": {"type": "object", "properties": {
                        "segment": {"type": "string"}, "value": {"type": "string"},
                        "count": {"type": "integer"}, "metric": _NUM_OR_NULL,
                        "too_small": {"type": "boolean"}}}}}}}}}}}}, "feedback"), **_ERR}}},
    "/admin/history": {"get": {
        "summary": "the status page's charts: per backend and route, answers by status code, tries, failures, "
                   "p50/p99, weights, mirror agreement and feedback, a point every 5 s over 15 minutes",
        "responses": {"200": _json(_ref("History"), "history"), **_ERR}}},
    "/admin/reload": {"post": {
        "summary": "re-read and validate the config file; swap it in when valid",
        "responses": {"200": _json(_ref("ReloadResult"), "reloaded (result ok) or no change (result unchanged)"),
                      "400": _json(_ref("Error"), "rejected (type invalid_config); the running config stays"),
                      **_MUTATING_ERR}}},
    "/admin/routes/{route}/weights": {
        "parameters": _ROUTE_PARAM,
        "put": {
            "summary": "runtime weight override: backends not named keep their weight; cleared by a reload "
                       "that changes the route; kept in state_dir when set",
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": _ref("Weights"), "examples": {"blue-green": {"value": {"stable": 0, "canary": 100}}}}}},
            "responses": {"200": _json(_ref("RouteStatus"), "the route with its new weights"),
                          "400": _json(_ref("Error"), "unknown backend, negative, not a number or all zero"),
                          "404": _json(_ref("Error"), "unknown route"),
                          "409": _json(_ref("Error"), "the route's rollout is progressing or baking "
                                                      "(type rollout_conflict): pause it first"),
                          "503": _STORE_ERR, **_MUTATING_ERR}},
        "delete": {
            "summary": "drop the route's override: back to the configured weights",
            "responses": {"200": _json(_ref("RouteStatus"), "the route with its configured weights"),
                          "404": _json(_ref("Error"), "unknown route"),
                          "409": _json(_ref("Error"), "the route's rollout is progressing or baking "
                                                      "(type rollout_conflict)"),
                          "503": _STORE_ERR, **_MUTATING_ERR}},
    },
    "/admin/routes/{route}/rollout": {
        "parameters": _ROUTE_PARAM,
        "get": {"summary": "the route's rollout: state, step, weights, decisions (docs/rollout.md)",
                "responses": {"200": _json(_ref("Rollout"), "the rollout"),
                              "404": _json(_ref("Error"), "unknown route, or a route without rollout"), **_ERR}},
    },
    "/admin/routes/{route}/rollout/{action}": {
        "parameters": [*_ROUTE_PARAM, *_ROLLOUT_ACTION],
        "post": {"summary": "steer the rollout: pause, resume, promote, rollback, restart (docs/rollout.md"
                            "#admin-actions)",
                 "responses": {"200": _json(_ref("Rollout"), "the rollout after the action"),
                               "404": _json(_ref("Error"), "unknown route or action, or no rollout"),
                               "409": _json(_ref("Error"), "the rollout's state does not allow the action, "
                                                           "it changed on another replica meanwhile, or this "
                                                           "replica's rollout config differs from the fleet's "
                                                           "(type rollout_conflict)"),
                               "503": _STORE_ERR, **_MUTATING_ERR}},
    },
    "/admin/fleet": {"get": {
        "summary": "this replica's view of its fleet (docs/fleet.md): the leader and its epoch, the members seen "
                   "within 3 x sync_every with the routes whose rollout config differs from the fleet's (skew), "
                   "the store's health",
        "responses": {"200": _json({"type": "object", "properties": {
            "name": {"type": ["string", "null"], "description": "null: no `fleet` is configured"},
            "replica": {"type": "string"}, "leader": _STR_OR_NULL,
            "epoch": {"type": "integer"}, "leading": {"type": "boolean"},
            "judging": {"type": "boolean", "description": "this replica judges rollouts now"},
            "members": {"type": "array", "items": {"type": "object", "properties": {
                "replica": {"type": "string"}, "last_sync": {"type": "number", "description": "Unix seconds"},
                "skew": {"type": "array", "items": {"type": "string"}}}}},
            "store": {"type": ["object", "null"], "properties": {
                "healthy": {"type": "boolean"}, "state": {"enum": ["unknown", "healthy", "down"]},
                "error": _STR_OR_NULL, "url": {"type": "string", "description": "without credentials"},
                "last_sync": _NUM_OR_NULL}},
            "skew": {"type": "array", "items": {"type": "object", "properties": {
                "route": {"type": "string"}, "key": {"type": "string"}, "fleet_key": {"type": "string"}}}},
            "lease_s": {"type": "number"}, "sync_every_s": {"type": "number"}}}, "the fleet"), **_ERR}}},
    "/admin/openapi.json": {"get": {"summary": "this document",
                                    "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1"), **_ERR}}},
}


def openapi_document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "model-sidecar admin API", "version": __version__,
                 "description": "Durations are seconds, rates are ratios from 0 to 1. With admin.token set, "
                                "every endpoint but /healthz, /readyz, /metrics and the page needs "
                                "'Authorization: Bearer <token>'. Without a token, a loopback listener answers "
                                "only requests whose Host is a loopback name or address with its port (else "
                                "421). Changes (POST, PUT, DELETE) from a web page of another origin are "
                                "refused with 403."},
        "components": {"schemas": _SCHEMAS,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
        "paths": _paths,
    }
