"""Bulk load: N small files copied into a watched folder at once.

Runs a real daemon in a temporary home with the default model and copies `--files` distinct
notes into its watched folder in one go. The report shows whether each file was summarized
exactly once: one summary row and one `document.summarized` event per file, no job left or
failed, and `PRAGMA integrity_check` passing. It also gives the `status` round trip during
the backlog (p50, p99, max) and the RSS of the daemon and of the model host over the run.

Run: .venv/bin/python bench/load.py [--files 10000] [--out report.json]
Needs the default model (`famulus model pull`). Prints a JSON report.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from famulus.daemon.model.registry import resolve  # noqa: E402
from famulus.daemon.paths import user_paths  # noqa: E402
from tests.conftest import DaemonHome, wait_for  # noqa: E402
from tests.reliability.harness import (  # noqa: E402
    FAST_CONFIG,
    FAST_MAX_NEW_TOKENS,
    Probe,
    drop_notes,
    ledger,
    summarized_count,
)


def run(files: int) -> dict[str, object]:
    model = resolve(user_paths().models_dir, "smollm2-135m-instruct", "")
    with tempfile.TemporaryDirectory(prefix="famulus-load-") as tmp:
        home = DaemonHome(Path(tmp), model)
        home.write_config(max_new_tokens=FAST_MAX_NEW_TOKENS, extra=FAST_CONFIG)
        proc = home.start()
        probe = Probe(f"ipc://{home.runtime / 'requests.sock'}", proc.pid,
                      rss_every_s=10.0).start()
        started = time.monotonic()
        try:
            paths = drop_notes(home.inbox, files)
            wait_for(lambda: summarized_count(home.database) >= files, 10 + files * 3.0,
                     f"{files} summaries")
            seconds = time.monotonic() - started
        finally:
            probe.stop()
            home.stop()
        result = ledger(home.database, paths)
    return {"files": files, "seconds": round(seconds, 1),
            "files_per_s": round(files / seconds, 2), "exactly_once": result.exactly_once,
            "ledger": result.__dict__, "status_during_backlog": probe.summary(),
            "status_failures": probe.failures[:10],
            "rss_kib": [{"t_s": t, "daemon": d, "model_host": m, "summarized": n}
                        for t, d, m, n in probe.rss]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=10_000, help="files copied at once")
    parser.add_argument("--out", type=Path, help="also write the report to this file")
    args = parser.parse_args()
    report = {"machine": {"platform": platform.platform(), "python": platform.python_version()},
              "load": run(args.files)}
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
