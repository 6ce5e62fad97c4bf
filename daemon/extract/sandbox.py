"""Text extraction in a child process with a time limit and a memory limit.

Parsers of untrusted files can loop for minutes (html.parser on some malformed markup) or
inflate a small file to gigabytes (a PDF stream that decompresses far past its size). Both
stay in the child: after `timeout_s` it is killed, and its address space is capped at
`memory_bytes`. The child serves one document after another and exits after `idle_exit_s`
without work, so an idle daemon keeps no parser in memory.
"""

from __future__ import annotations

import json
import logging
import pathlib
import select
import subprocess
import sys
import threading
from typing import Any

from famulus.daemon.extract import Extracted, ExtractionError

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 30.0


class ExtractionSandbox:
    """Runs `extract_text` in a child process, one document at a time."""

    def __init__(self, *, timeout_s: float, memory_bytes: int, idle_exit_s: float = 60.0
                 ) -> None:
        self.timeout_s = timeout_s
        self.memory_bytes = memory_bytes
        self.idle_exit_s = idle_exit_s
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[str] | None = None
        self._idle_timer: threading.Timer | None = None

    def extract(self, path: pathlib.Path, *, max_bytes: int) -> Extracted:
        """Extract the text of `path`; raise ExtractionError with a reason when that fails."""
        reply = self._serve({"path": str(path), "max_bytes": max_bytes}, path)
        return Extracted(text=reply["text"], format=reply["format"], pages=reply["pages"],
                         notes=tuple(reply["notes"]))

    def decode_image(self, path: pathlib.Path, *, max_bytes: int, max_side_px: int,
                     max_pixels: int) -> dict[str, Any]:
        """Decode and scale the image at `path` in the child.

        Returns the reply: `pixels` (base64 RGB samples, HWC), `shape` ([height, width, 3]),
        `format` and `source_size`. Raises ExtractionError with a reason when that fails.
        """
        return self._serve({"op": "image", "path": str(path), "max_bytes": max_bytes,
                            "max_side_px": max_side_px, "max_pixels": max_pixels}, path)

    def close(self) -> None:
        with self._lock:
            if self._idle_timer is not None:
                self._idle_timer.cancel()
            self._stop()

    def _serve(self, request: dict[str, Any], path: pathlib.Path) -> dict[str, Any]:
        with self._lock:
            if self._idle_timer is not None:
                self._idle_timer.cancel()
            try:
                return self._call(request, path)
            finally:
                self._idle_timer = threading.Timer(self.idle_exit_s, self._stop_if_idle)
                self._idle_timer.daemon = True
                self._idle_timer.start()

    def _call(self, request: dict[str, Any], path: pathlib.Path) -> dict[str, Any]:
        proc = self._child()
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(json.dumps(request, ensure_ascii=True) + "\n")
            proc.stdin.flush()
        except OSError:
            self._stop()
            raise self._crashed(path, proc) from None
        ready, _, _ = select.select([proc.stdout], [], [], self.timeout_s)
        if not ready:
            self._stop()
            logger.warning("extraction timed out: path=%s timeout_s=%.1f", path, self.timeout_s)
            raise ExtractionError(
                "timeout", f"reading {path} took longer than {self.timeout_s:g} s "
                "and was stopped; raise extract.timeout_s in the famulus config to allow more")
        line = proc.stdout.readline()
        if not line:
            self._stop()
            raise self._crashed(path, proc)
        reply: dict[str, Any] = json.loads(line)
        if not reply["ok"]:
            if reply["reason"] == "memory":
                self._stop()  # the child exits after a MemoryError
            raise ExtractionError(reply["reason"], reply["message"],
                                  permanent=reply["permanent"])
        return reply

    def _crashed(self, path: pathlib.Path, proc: subprocess.Popen[str]) -> ExtractionError:
        code = proc.poll()
        logger.warning("extraction child died: path=%s exit_code=%s", path, code)
        return ExtractionError(
            "crashed", f"the extraction process died while reading {path} (exit code {code}); "
            "the file may be malformed in a way that crashes its parser")

    def _child(self) -> subprocess.Popen[str]:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        # A module run with -m, not multiprocessing: nothing of the daemon (ZeroMQ, SQLite,
        # threads) is inherited or imported again.
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "famulus.daemon.extract.child", str(self.memory_bytes)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, encoding="ascii",
            close_fds=True)
        logger.debug("extraction child started: pid=%d", self._proc.pid)
        return self._proc

    def _stop_if_idle(self) -> None:
        # Skips the stop when a call holds the lock: it starts a new timer when it ends.
        if self._lock.acquire(blocking=False):
            try:
                self._stop()
            finally:
                self._lock.release()

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait(START_TIMEOUT_S)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()
