"""Faults: the daemon killed with SIGKILL again and again, the model host killed mid-generation."""

from __future__ import annotations

import ctypes
import os
import random
import signal
import time
from pathlib import Path

import pytest

from famulus.ipc.protocol import Topic
from tests.conftest import CORPUS, DaemonHome, processes_with_home, wait_for, wait_for_none
from tests.reliability.harness import (
    FAST_CONFIG,
    FAST_MAX_NEW_TOKENS,
    drop_notes,
    ledger,
    summarized_count,
)

# The tgkill system call's number differs between architectures.
SYS_TGKILL = {"x86_64": 234, "aarch64": 131}.get(os.uname().machine)
FILES = 200
KILLS = 10
# About 0.3 s a file on two idle cores; the bound leaves room for a busy machine.
RUN_TIMEOUT_S = 10 + FILES * 3.0


@pytest.mark.timeout(KILLS * 60 + RUN_TIMEOUT_S)
def test_repeated_kill9_summarizes_each_file_once(daemon_home: DaemonHome) -> None:
    daemon_home.write_config(max_new_tokens=FAST_MAX_NEW_TOKENS, extra=FAST_CONFIG)
    # Fixed seed: a failure can be replayed with the same kill points.
    rng = random.Random(8)
    paths: list[Path] = []
    kills_with_work_left = 0
    for round_ in range(KILLS):
        proc = daemon_home.start(wait_model=False)
        if round_ == 0:
            paths = drop_notes(daemon_home.inbox, FILES)
        # Random points: during the start-up scan, the model load, a generation or a commit.
        done_before = summarized_count(daemon_home.database)
        # The delay is the kill point itself, not a wait for some state.
        time.sleep(rng.uniform(0.3, 4.0))
        assert proc.poll() is None, "the daemon exited before it was killed"
        if summarized_count(daemon_home.database) < FILES:
            kills_with_work_left += 1
        daemon_home.stop(signal.SIGKILL)
        # The model host notices its parent is gone and exits by itself.
        leftovers = wait_for_none(lambda: processes_with_home(daemon_home.root), 15)
        assert leftovers == [], f"processes left after kill {round_ + 1}: {leftovers}"
        assert summarized_count(daemon_home.database) >= done_before

    daemon_home.start(wait_model=False)
    wait_for(lambda: summarized_count(daemon_home.database) >= FILES, RUN_TIMEOUT_S,
             f"{FILES} summaries after {KILLS} kills")
    result = ledger(daemon_home.database, paths)
    assert kills_with_work_left >= KILLS // 2, "the run ended before most kills"
    assert result.missing == []
    assert result.duplicate_summaries == []
    assert result.duplicate_events == []
    assert result.states == {"summarized": FILES}
    assert result.jobs_unfinished == 0
    assert result.jobs_failed == 0
    assert result.integrity == "ok"


def test_model_host_kill9_mid_generation_recovers(daemon_home: DaemonHome) -> None:
    daemon_home.write_config(max_new_tokens=400)
    daemon_home.start()
    first_host = daemon_home.status()["model"]["pid"]
    with daemon_home.client() as client:
        job = client.call("summarize", {"text": (CORPUS / "documents" / "crazy-ones.txt")
                                        .read_text(encoding="utf-8") * 3, "stream": True})["job"]
    assert daemon_home.log is not None
    daemon_home.log.wait(lambda e: e.topic == Topic.JOB_TOKEN and e.body["job"] == job, 120,
                         "the first tokens")
    os.kill(first_host, signal.SIGKILL)

    done = daemon_home.log.wait(
        lambda e: e.topic in (Topic.JOB_DONE, Topic.JOB_FAILED) and e.body["job"] == job,
        180, "the job to end")
    assert done.topic == Topic.JOB_DONE
    status = daemon_home.status()
    assert status["state"] == "running"
    assert status["model"]["restarts"] >= 1
    assert status["model"]["pid"] != first_host
    rows = daemon_home.rows("SELECT state, attempts FROM jobs WHERE id = ?", (job,))
    assert rows[0]["state"] == "done"
    assert rows[0]["attempts"] == 2
    assert len(daemon_home.log.matching(Topic.JOB_DONE, job=job)) == 1


def signal_thread(pid: int, tid: int, sig: int) -> None:
    """Send `sig` to one thread of another process (tgkill), as the kernel may on its own."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(SYS_TGKILL, pid, tid, sig) != 0:
        raise OSError(ctypes.get_errno(), f"tgkill({pid}, {tid}, {sig}) failed")


def accepts_signal(pid: int, tid: int, sig: int) -> bool:
    for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
        if line.startswith("SigBlk:"):
            return not int(line.split()[1], 16) & (1 << (sig - 1))
    return False


@pytest.mark.skipif(SYS_TGKILL is None, reason="tgkill number unknown for this machine")
def test_sigterm_on_worker_thread_stops_daemon(daemon_home: DaemonHome) -> None:
    proc = daemon_home.start()
    tids = [int(t.name) for t in Path(f"/proc/{proc.pid}/task").iterdir()]
    others = [tid for tid in tids if tid != proc.pid and accepts_signal(proc.pid, tid,
                                                                         signal.SIGTERM)]
    assert others, "no thread besides the main one accepts SIGTERM"
    if daemon_home.log is not None:
        daemon_home.log.close()
        daemon_home.log = None
    signal_thread(proc.pid, others[0], signal.SIGTERM)
    # Python runs the handler in the main thread, which must wake up for it.
    assert proc.wait(15) == 0
    assert "received SIGTERM; shutting down" in daemon_home.stderr()
