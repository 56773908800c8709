"""How a piece's way through the model chain can end other than with an answer (worker.chain raises
these; worker.waves and the group run act on them)."""

from __future__ import annotations

from core.statuses import JobStatus


class Handoff(Exception):
    """Raised when the chain reaches `local`: the job goes to the local engine's queue."""


class Halted(Exception):
    """Raised instead of starting a call once a sibling chunk has ended the job."""


class JobEnded(Exception):
    """Raised when a job cannot be transcribed: it ends with this status, code and message."""

    def __init__(self, status: JobStatus, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
