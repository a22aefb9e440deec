"""Reliability harness: fault matrix, overload and soak runs, shared by the test
suite (tests/reliability/, CI-sized) and by scripts for the long runs whose figures go in
docs/reliability.md. Run from the repository root: `python -m reliability.faults --report`,
`python -m reliability.overload`, `python -m reliability.soak --minutes 10`.

Imports: stdlib, aiohttp, yaml, sidecar, tests.upstreams (the fake model servers).
"""
