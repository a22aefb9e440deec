"""A CI-sized soak (reliability/soak.py): ~15 s of mixed traffic with faults, mirrors to a
shadow that sometimes hangs, retries, sampling into a redacted sample log, weights PUTs and
reloads through POST /admin/reload, against a real `sidecar run` process: it loses nothing
and leaks no fds or tasks."""

from __future__ import annotations

from reliability.soak import run_soak


async def test_short_soak_loses_nothing_and_leaks_nothing(tmp_path):
    """Every request gets its documented answer, the sidecar counts exactly what was sent, fds and tasks stay flat."""
    s = await run_soak(seconds=15, concurrency=12, sample_every_s=1.5, reload_every_s=5, weights_every_s=2,
                       workdir=tmp_path, log=False)
    assert s["lost"] == 0, s["lost_by_kind"]
    assert s["accounted"], (s["sidecar_counted"], s["requests"])
    assert s["healthy_at_end"] and s["exit_code"] == 0
    assert s["fds_end_max"] <= s["fds_after_warmup_max"] + 16, s
    assert s["tasks_end_max"] <= s["tasks_after_warmup_max"] + 16, s
    # RSS over 15 s is noise-dominated; the 10-minute run (docs/reliability.md#soak) judges it
    assert s["rss_growth_pct"] is not None and s["rss_growth_pct"] < 25, s
    assert all(s["by_kind"].values()), s["by_kind"]  # every kind was sent and answered
    # the merged capabilities: every rewrite reloaded, every PUT persisted, mirrors counted, log redacted
    assert s["checks"] == {"reloads": True, "weights": True, "sample_log": True}, s
    assert s["config_rewrites"] >= 2 and s["reloads_applied"] == s["config_rewrites"], s
    assert s["mirror_outcomes"]["agree"] > 0 and s["mirror_outcomes"]["shadow_timeout"] > 0, s["mirror_outcomes"]
    assert s["mirror_outcomes"]["internal_error"] == 0, s["mirror_outcomes"]
    assert s["sample_log_redacted_value_seen"] == 0 and s["sample_log_lines_in_files"] > 0, s
