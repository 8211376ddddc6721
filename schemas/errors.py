"""One error shape for every input the pipeline refuses.

``error_type`` is a stable single word (``EncryptedDocument``, ``BlobNotAllowed``,
``InvalidVectors``...) that dead letters, page failures and API errors carry;
``message`` is for people and says what to do about it.
"""

from __future__ import annotations

from typing import Any


class PipelineError(Exception):
    """An input that no retry can fix: it ends as a dead letter (or an HTTP 4xx)."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        # Keeps the error intact across process pools (the splitter's render workers).
        return (type(self), (self.error_type, self.message))
