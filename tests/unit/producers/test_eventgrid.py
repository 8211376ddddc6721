"""The Event Grid core without HTTP: envelope parsing, the document id rule and the
bounded duplicate memory (the webhook's own tests are tests/unit/api/test_eventgrid.py)."""

from __future__ import annotations

from colstream.producers.eventgrid import EventGridProcessor, derive_document_id, parse_delivery
from colstream.schemas.ids import is_valid_document_id
from tests.fixtures.eventgrid import CE_BLOB_DELETED, EG_BLOB_CREATED, FakePublisher, make_settings, with_


def test_dedupe_memory_is_bounded() -> None:
    publisher = FakePublisher()
    settings = make_settings(dedupe_capacity=2)
    processor = EventGridProcessor(settings.eventgrid, settings.blob, publisher)
    for n in range(3):
        processor.handle(
            [
                with_(
                    EG_BLOB_CREATED[0],
                    id=f"e{n}",
                    sequencer=None,
                    url=f"https://example.blob.core.windows.net/testcontainer/{n}.pdf",
                )
            ]
        )
    processor.handle(
        [
            with_(
                EG_BLOB_CREATED[0],
                id="e0",
                sequencer=None,
                url="https://example.blob.core.windows.net/testcontainer/0.pdf",
            )
        ]
    )
    # e0 fell out of the 2-entry LRU, so it is applied again (harmless downstream).
    assert len(publisher.calls) == 4
    assert len(processor._seen_ids) == 2


def test_document_id_escaping_is_valid_and_injective() -> None:
    spaced = derive_document_id(
        "{container}/{blob}", account="a", container="docs", blob="reports/Q1 2026.pdf"
    )
    assert spaced == "docs/reports/Q1=202026.pdf"
    literal = derive_document_id(
        "{container}/{blob}", account="a", container="docs", blob="reports/Q1=202026.pdf"
    )
    assert literal != spaced and is_valid_document_id(literal)
    for blob in ("ünïcode/файл.pdf", "a..b.pdf", "a....pdf", "x#y?z%.pdf", "tab\there"):
        assert is_valid_document_id(
            derive_document_id("{container}/{blob}", account="a", container="c1", blob=blob)
        )


def test_parse_delivery_accepts_mixed_schema_batch() -> None:
    events = parse_delivery([EG_BLOB_CREATED[0], CE_BLOB_DELETED])
    assert [(e.schema, e.type) for e in events] == [
        ("eventgrid", "Microsoft.Storage.BlobCreated"),
        ("cloudevents", "Microsoft.Storage.BlobDeleted"),
    ]
