"""Whose turn it is on a replica's one pipeline: small requests are not stuck behind a large one.

A job holds the pipeline for its whole denoise. A large job (more work than the small-request
limit) lends it between two of its denoising steps whenever small jobs wait: they run to the end,
then the large job goes on where it stopped (the pipeline keeps each denoise's own timesteps,
weights and callbacks, so the nested run changes nothing of it). A small request thus waits at most
one step of a large one, not all of it. Large jobs wait while small ones queue; a steady stream of
small jobs can delay a large one, never the reverse.
"""
from __future__ import annotations

import threading


class PipelineTurns:
    def __init__(self):
        self._cond = threading.Condition()
        self._busy = False  # a job owns the pipeline
        self._lent = False  # its owner, a large job, paused and lent it to small jobs
        self._borrowed = False  # a small job runs on the lent pipeline
        self._small_waiting = 0
        self.lent = 0  # times a large job paused for small ones

    def acquire(self, small: bool) -> bool:
        """Block until this job may run; True if it borrows a paused large job's pipeline."""
        with self._cond:
            self._small_waiting += small
            while not (((not self._busy) or (self._lent and not self._borrowed)) if small
                       else (not self._busy and not self._small_waiting)):
                self._cond.wait()
            self._small_waiting -= small
            borrowed = self._busy
            if borrowed:
                self._borrowed = True
            else:
                self._busy = True
            return borrowed

    def release(self, borrowed: bool) -> None:
        with self._cond:
            if borrowed:
                self._borrowed = False
            else:
                self._busy = False
            self._cond.notify_all()

    def between_steps(self) -> None:
        """Called by a large job between denoising steps: let every waiting small job run first."""
        with self._cond:
            if not self._small_waiting:
                return
            self._lent, self.lent = True, self.lent + 1
            self._cond.notify_all()
            while self._small_waiting or self._borrowed:
                self._cond.wait()
            self._lent = False
