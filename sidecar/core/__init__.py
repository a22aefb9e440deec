"""Pure decision logic: splitting, outcomes, breakers, budgets, retries, balancing, JSON
paths, comparison, rolling windows and drift statistics.

Nothing here awaits, logs or touches a socket. Allowed imports: the standard library,
numpy, and scipy.stats (lazily, inside drift functions). Clocks (`now`, monotonic seconds)
and random sources (`rng`, a callable returning floats in [0, 1)) are passed in, so every
module is tested deterministically without sockets. tests/test_layering.py enforces this.
"""
