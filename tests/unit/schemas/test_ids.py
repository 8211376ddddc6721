"""The one document id rule, and every entry point that applies it."""

from __future__ import annotations

import pytest
from pydantic import TypeAdapter, ValidationError

from colstream.schemas.codec import InvalidRecord, decode_upload
from colstream.schemas.events import DeadLetter, DocumentRecord, DocumentRef, UploadEvent
from colstream.schemas.ids import DOCUMENT_ID_PATTERN, DocumentId, InvalidDocumentId, check_document_id

VALID = [
    "a",
    "invoice-42",
    "contracts/2026/a.pdf",
    "testcontainer/testfile.txt",
    "example:testfile",
    "docs/reports/Q1=202026.pdf",
    "a./b",
    "a/.hidden",
    "x" * 256,
]
INVALID = [
    "abc\n",
    "abc\r",
    "a\x00b",
    "a//b",
    "a/",
    "a/./b",
    "a/.",
    "a/../b",
    "a..b",
    "/a",
    ".a",
    "_a",
    "a b",
    "x" * 257,
    "",
    "é",
]


@pytest.mark.parametrize("value", VALID)
def test_valid_ids_pass(value: str) -> None:
    assert check_document_id(value) == value
    assert UploadEvent(document_id=value, blob_uri="file:///x").document_id == value


@pytest.mark.parametrize("value", INVALID)
def test_invalid_ids_fail_with_a_full_match(value: str) -> None:
    with pytest.raises(InvalidDocumentId):
        check_document_id(value)
    with pytest.raises(ValidationError, match="document_id must be"):
        UploadEvent(document_id=value, blob_uri="file:///x")


def test_trailing_newline_is_refused_on_kafka_uploads_and_tombstones() -> None:
    body = b'{"document_id": "abc\\n", "blob_uri": "file:///x"}'
    with pytest.raises(InvalidRecord) as upload:
        decode_upload("abc\n", body)
    assert upload.value.error_type == "InvalidEvent"
    with pytest.raises(InvalidRecord) as tombstone:
        decode_upload("abc\n", None)
    assert tombstone.value.error_type == "InvalidKey"
    assert decode_upload("abc", None) is None


def test_the_pattern_is_in_the_json_schema() -> None:
    schema = TypeAdapter(DocumentId).json_schema()
    assert schema["pattern"] == DOCUMENT_ID_PATTERN
    assert schema["maxLength"] == 256
    assert UploadEvent.model_json_schema()["properties"]["document_id"]["pattern"] == DOCUMENT_ID_PATTERN


# ----------------------------------------------------------------------------- SAS redaction


def test_upload_event_refuses_a_query_string() -> None:
    with pytest.raises(ValidationError, match="query string"):
        UploadEvent(document_id="a", blob_uri="https://acct.blob.core.windows.net/c/a.pdf?sv=1&sig=SECRET")


def test_records_refs_and_dead_letters_never_keep_a_query() -> None:
    signed = "https://acct.blob.core.windows.net/c/a.pdf?sv=2024&sig=SECRET"
    record = DocumentRecord(
        document_id="a", version=1, state="failed", blob_uri=signed, filename="a.pdf?sv=2024&sig=SECRET"
    )
    assert record.blob_uri == "https://acct.blob.core.windows.net/c/a.pdf"
    assert record.filename == "a.pdf"
    assert "SECRET" not in record.model_dump_json()
    ref = DocumentRef(document_id="a", version=1, blob_uri=signed)
    assert ref.blob_uri == "https://acct.blob.core.windows.net/c/a.pdf"
    letter = DeadLetter(
        stage="splitter",
        error_type="InvalidEvent",
        message=f"refusing {signed}",
        source_topic="documents.uploads",
        original_value=f'{{"document_id": "a", "blob_uri": "{signed}"}}',
    )
    assert "SECRET" not in letter.model_dump_json()
    assert letter.original_value == '{"document_id": "a", "blob_uri": "https://acct.blob.core.windows.net/c/a.pdf?<redacted>"}'


def test_filename_never_comes_from_a_query() -> None:
    event = UploadEvent(document_id="a", blob_uri="https://acct.blob.core.windows.net/c/dir/report%201.pdf")
    assert event.display_name() == "report 1.pdf"
