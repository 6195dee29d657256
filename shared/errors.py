"""Errors that more than one wing raises or handles."""

from __future__ import annotations

from shelfsight.shared.events import ErrorCode


class Rejected(Exception):
    """A permanent problem with an event or its image: dead-letter it, do not retry.

    `code` is the dead-letter error code; the message says what was wrong and with what.
    """

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
