"""Publish failures as HTTP answers: failed, or outcome unknown.

A publish that the broker refused never happened: the API answers 503 and may
remove what the record would have referenced (the upload's blob). A publish that
was not acknowledged in time (or whose error leaves it open) may still be written
from the producer's queue once the broker answers, so the API answers
504 with a body saying the outcome is unknown and that sending the same request
again, with the same ``document_id``, is safe: the uploads topic is keyed by
``document_id`` and the sink applies the latest version. The blob stays, because
a record that lands later points at it; the retention sweeper (``colstream gc``)
removes it if no record ever does.
"""

from __future__ import annotations

from fastapi import HTTPException

from colstream.api.failures import public_reason
from colstream.infra.kafka import DeliveryOutcomeUnknown

OUTCOME_UNKNOWN_STATUS = 504
RETRY_AFTER_S = 5


class PublishOutcomeUnknown(HTTPException):
    def __init__(self, reason: str) -> None:
        super().__init__(
            OUTCOME_UNKNOWN_STATUS,
            detail=(
                f"outcome unknown: Kafka did not confirm the record ({reason}); it may still be applied. "
                "Retrying the same request with the same document_id is safe; "
                "GET /documents/{document_id} shows what was applied."
            ),
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )


def publish_http_error(exc: Exception) -> HTTPException:
    if isinstance(exc, DeliveryOutcomeUnknown):
        return PublishOutcomeUnknown(public_reason(exc))
    return HTTPException(503, f"could not publish to Kafka: {public_reason(exc)}")
