"""Pure decision logic: splitting, outcomes, breakers, budgets, retries, the retry/hedge/
fallback step machine (attempts.py), balancing, JSON paths, comparison, rolling windows,
drift statistics and log throttling.

Nothing here awaits, logs or touches a socket. Allowed imports: the standard library,
numpy, and scipy.stats (lazily, inside drift functions). Clocks (`now`, monotonic seconds)
and random sources (`rng`, a callable returning floats in [0, 1)) are passed in, so every
module is tested deterministically without sockets. tests/test_layering.py enforces this.
"""
