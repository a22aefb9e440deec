"""The fault matrix (reliability/faults.py): every request gets exactly one answer, the
backend's or a documented sidecar error, and the sidecar stays up and serves. The same
table covers shadows, health-check paths, retries and bad disks under the sample log and
the state dir (each `Fault.role`)."""

from __future__ import annotations

import pytest

from reliability.faults import ALL_FAULTS, Fault, run_fault, run_restart
from tests.conftest import MakeSidecar


@pytest.mark.parametrize("fault", ALL_FAULTS, ids=[f.name for f in ALL_FAULTS])
async def test_fault(fault: Fault, upstreams, make_sidecar: MakeSidecar, client):
    """Under this fault the clients see only the documented answers, none lost, sidecar up."""
    result = await run_fault(fault, upstreams, make_sidecar, client)
    unexpected = {o: n for o, n in result.counts.items() if o not in fault.allowed}
    assert not unexpected, f"{fault.name}: answers outside the documented ones: {unexpected}"
    assert set(fault.must_see) <= set(result.counts), f"{fault.name}: the fault never showed: {result.counts}"
    assert sum(result.counts.values()) == fault.n
    assert result.sidecar_counted == fault.n, "the sidecar's requests_total disagrees with the clients"
    if result.upstream_hits is not None:
        assert result.upstream_hits <= fault.n, "a request reached the backend twice"
    assert not result.problems, (result.problems, result.side)
    assert result.healthy_after and result.normal_after == (200, "backend")


async def test_backend_restart_under_load(upstreams, make_sidecar: MakeSidecar, client):
    """A backend that stops mid-traffic and comes back on the same port: 502s while down, then 200s."""
    result = await run_restart(upstreams, make_sidecar, client)
    assert result.lost == 0, result.counts
    assert result.counts[(200, "backend")] > 0 and result.counts[(502, "upstream_error")] > 0
    assert result.sidecar_counted == sum(result.counts.values())
    assert result.healthy_after and result.normal_after == (200, "backend")
