"""Periodic work: folder rescans, digests, the retention purge and the battery check.

APScheduler 3's BackgroundScheduler runs the jobs: the daemon is built from threads, with no
asyncio event loop, so the scheduler gets a thread of its own. That thread sleeps until the
next job is due, so the scheduler adds no wake-ups beyond its configured jobs.

Every job coalesces missed runs, may be late by `schedule.misfire_grace_s` and never runs twice
at once. After a suspend (or SIGSTOP and SIGCONT) each job runs once to catch up, not once per
missed interval. A run later than the grace time is skipped and logged.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from apscheduler.events import (
    EVENT_JOB_ERROR,
    EVENT_JOB_EXECUTED,
    EVENT_JOB_MISSED,
    JobExecutionEvent,
)
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler

logger = logging.getLogger(__name__)

# A run that starts this much after its due time is logged as a catch-up run.
LATE_RUN_S = 1.0


class Scheduler:
    def __init__(self, misfire_grace_s: float) -> None:
        self._scheduler = BackgroundScheduler(
            timezone=UTC,
            executors={"default": ThreadPoolExecutor(max_workers=4)},
            job_defaults={"coalesce": True, "max_instances": 1,
                          "misfire_grace_time": int(misfire_grace_s)})
        self._scheduler.add_listener(self._on_event,
                                     EVENT_JOB_MISSED | EVENT_JOB_ERROR | EVENT_JOB_EXECUTED)
        # APScheduler logs every run at INFO; the daemon logs only what is unusual.
        logging.getLogger("apscheduler").setLevel(logging.WARNING)
        self._lock = threading.Lock()

    def start(self) -> None:
        self._scheduler.start()

    def add_interval(self, job_id: str, fn: Callable[[], None], interval_s: float,
                     *, run_now: bool = False) -> None:
        """Run `fn` every `interval_s` seconds (first after one interval, or now)."""
        start = datetime.now(UTC) + (timedelta(0) if run_now else timedelta(seconds=interval_s))
        with self._lock:
            self._scheduler.add_job(fn, "interval", seconds=interval_s, id=job_id,
                                    name=job_id, next_run_time=start, replace_existing=True)
        logger.info("scheduled: job=%s interval_s=%g", job_id, interval_s)

    def remove(self, job_id: str) -> None:
        with self._lock:
            try:
                self._scheduler.remove_job(job_id)
            except JobLookupError:
                pass

    def job_ids(self) -> list[str]:
        return [job.id for job in self._scheduler.get_jobs()]

    def shutdown(self, _timeout: float) -> None:
        # wait=False: a job still running is a daemon thread that ends with the process.
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)

    def _on_event(self, event: JobExecutionEvent) -> None:
        if event.code == EVENT_JOB_MISSED:
            logger.warning("scheduled run skipped, more than the grace time late: job=%s "
                           "due=%s", event.job_id, event.scheduled_run_time.isoformat())
        elif event.code == EVENT_JOB_ERROR:
            logger.error("scheduled job failed: job=%s error=%r", event.job_id,
                         event.exception)
        else:
            late = (datetime.now(UTC) - event.scheduled_run_time).total_seconds()
            if late > LATE_RUN_S:
                logger.info("catch-up run of a missed schedule: job=%s due=%s late_s=%.1f",
                            event.job_id, event.scheduled_run_time.isoformat(), late)
