"""Load: a bulk copy of small files into a watched folder, each summarized exactly once."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import DaemonHome, wait_for
from tests.reliability.harness import (
    FAST_CONFIG,
    FAST_MAX_NEW_TOKENS,
    Probe,
    drop_notes,
    ledger,
    summarized_count,
)

# bench/load.py runs the same with 10,000 files and records the numbers. The variable is for
# a quick local run; CI uses the default.
FILES = int(os.environ.get("FAMULUS_LOAD_FILES", "2000"))
# About 0.3 s a file on two idle cores; the bound leaves room for a busy machine.
RUN_TIMEOUT_S = 10 + FILES * 1.5


@pytest.mark.timeout(RUN_TIMEOUT_S + 120)
def test_bulk_copy_summarized_exactly_once(daemon_home: DaemonHome, tmp_path: Path) -> None:
    daemon_home.write_config(max_new_tokens=FAST_MAX_NEW_TOKENS, extra=FAST_CONFIG)
    proc = daemon_home.start()
    probe = Probe(f"ipc://{daemon_home.runtime / 'requests.sock'}", proc.pid).start()
    try:
        paths = drop_notes(daemon_home.inbox, FILES)
        wait_for(lambda: summarized_count(daemon_home.database) >= FILES, RUN_TIMEOUT_S,
                 f"{FILES} summaries")
    finally:
        probe.stop()
    result = ledger(daemon_home.database, paths)
    report = {"files": FILES, "ledger": result.__dict__, "status": probe.summary(),
              "rss": probe.rss}
    artifacts = Path(os.environ.get("FAMULUS_TEST_ARTIFACTS", tmp_path))
    artifacts.mkdir(parents=True, exist_ok=True)
    (artifacts / "load-report.json").write_text(json.dumps(report, indent=1))

    assert result.missing == []
    assert result.duplicate_summaries == []
    assert result.duplicate_events == []
    assert result.states == {"summarized": FILES}
    assert result.summaries == FILES
    assert result.jobs_unfinished == 0
    assert result.jobs_failed == 0
    assert result.integrity == "ok"
    # Every status call during the backlog got a reply (the client's own timeout is 10 s).
    assert probe.failures == []
    assert len(probe.latencies_ms) > 10
    # No growth with the backlog: the daemon's RSS at the end stays near its level after the
    # first quarter of the run (a leak of a few KiB per file would show as megabytes).
    samples = [kib for _, kib, _, _ in probe.rss if kib is not None]
    assert len(samples) >= 4
    settled = samples[len(samples) // 4]
    assert samples[-1] < settled * 1.25 + 8 * 1024, f"daemon RSS grew: {samples}"
