"""A CI-sized soak (reliability/soak.py): ~15 s of mixed traffic with faults against a real
`sidecar run` process loses nothing and leaks no fds or tasks."""

from __future__ import annotations

from reliability.soak import run_soak


async def test_short_soak_loses_nothing_and_leaks_nothing(tmp_path):
    """Every request gets its documented answer, the sidecar counts exactly what was sent, fds and tasks stay flat."""
    s = await run_soak(seconds=15, concurrency=12, sample_every_s=1.5, reload_every_s=5, workdir=tmp_path, log=False)
    assert s["lost"] == 0, s["lost_by_kind"]
    assert s["accounted"], (s["sidecar_counted"], s["requests"])
    assert s["healthy_at_end"] and s["exit_code"] == 0
    assert s["fds_end_max"] <= s["fds_after_warmup_max"] + 16, s
    assert s["tasks_end_max"] <= s["tasks_after_warmup_max"] + 16, s
    # RSS over 15 s is noise-dominated; the 10-minute run (docs/reliability.md) judges it
    assert s["rss_growth_pct"] is not None and s["rss_growth_pct"] < 25, s
    assert all(s["by_kind"].values()), s["by_kind"]  # every kind was sent and answered
