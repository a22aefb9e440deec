"""Pure decision logic: splitting, outcomes, breakers, budgets, retries, the retry/hedge/
fallback step machine (attempts.py), balancing, JSON paths, comparison, rolling windows,
drift statistics, log throttling, the feedback store and metrics, and progressive rollout
(gates, the sequential error test, the rollout state machine).

Nothing here awaits, logs or touches a socket. Allowed imports: the standard library,
numpy, and scipy.stats (lazily, inside the drift and gate functions that need a p-value).
Clocks (`now`, monotonic seconds; wall-clock seconds in rollout.py, whose state outlives the
process) and random sources (`rng`, a callable returning floats in [0, 1)) are passed in, so
every module is tested deterministically without sockets. tests/test_layering.py enforces this.
"""
