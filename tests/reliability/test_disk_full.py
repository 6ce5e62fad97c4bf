"""The data folder's disk full: a clear error, no corruption, recovery once space returns."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import DaemonHome, wait_for
from tests.reliability.harness import (
    FAST_CONFIG,
    FAST_MAX_NEW_TOKENS,
    drop_notes,
    ledger,
    summarized_count,
)

FILES = 5


@pytest.fixture
def small_data_disk(daemon_home: DaemonHome) -> Iterator[Path]:
    """Mount an 8 MiB tmpfs as the daemon's data folder (XDG_DATA_HOME)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    data = Path(daemon_home.env["XDG_DATA_HOME"])
    data.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(data)],
                   check=True)
    try:
        yield data
    finally:
        daemon_home.stop()
        subprocess.run(["umount", "--lazy", str(data)], check=False)


def fill(disk: Path) -> Path:
    """Take every free block of `disk` with one file and return it."""
    filler = disk / "filler"
    with filler.open("wb") as out:
        block = b"\0" * 65536
        try:
            while True:
                out.write(block)
                out.flush()
        except OSError:
            pass
    assert shutil.disk_usage(disk).free < 65536
    return filler


def test_full_disk_recovers_when_space_returns(daemon_home: DaemonHome,
                                               small_data_disk: Path) -> None:
    daemon_home.write_config(max_new_tokens=FAST_MAX_NEW_TOKENS, extra=FAST_CONFIG)
    daemon_home.start()
    filler = fill(small_data_disk)

    paths = drop_notes(daemon_home.inbox, FILES)
    wait_for(lambda: "is full" in daemon_home.stderr(), 60, "the disk-full error in the log")
    assert daemon_home.status()["storage_full"] is True
    assert daemon_home.stderr().count("famulus records nothing until space is freed") == 1
    assert summarized_count(daemon_home.database) == 0

    filler.unlink()
    wait_for(lambda: summarized_count(daemon_home.database) >= FILES, 120,
             f"{FILES} summaries after space returned")
    assert daemon_home.status()["storage_full"] is False
    result = ledger(daemon_home.database, paths)
    assert result.exactly_once, result
    assert "disk space is available again" in daemon_home.stderr()
