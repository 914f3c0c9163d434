"""Heartbeats for the trials this process has in flight.

The sweeper (not the job) owns a trial from ask to tell, so it records the heartbeat:
that covers jobs in this process (basic launcher) and in joblib's workers alike.
A trial whose sweeper died stops beating and, grace_period seconds later, any
worker's `phitune.sweep.study.fail_stale_trials` marks it FAILED, says why in its
`error` user attr ("no heartbeat for N s ...") and enqueues a retry.
"""
from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)


class Heartbeat:
    def __init__(self, storage, interval_s: float | None):
        self._storage = storage
        self._interval = interval_s
        self._ids: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return bool(self._interval)

    def __enter__(self) -> "Heartbeat":
        if self.enabled:
            self._thread = threading.Thread(target=self._run, name="phitune-heartbeat", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def add(self, trial_id: int) -> None:
        if not self.enabled:
            return
        self._beat(trial_id)  # at once: a trial without any heartbeat can never be found stale
        with self._lock:
            self._ids.add(trial_id)

    def remove(self, trial_id: int) -> None:
        with self._lock:
            self._ids.discard(trial_id)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            with self._lock:
                ids = sorted(self._ids)
            for trial_id in ids:
                self._beat(trial_id)

    def _beat(self, trial_id: int) -> None:
        try:
            self._storage.record_heartbeat(trial_id)
        except Exception as exc:  # a busy database: the next beat will do; grace_period spans several
            log.warning("heartbeat for trial id %s failed: %s", trial_id, exc)
