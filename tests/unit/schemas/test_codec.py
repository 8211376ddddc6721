"""Contracts: what a person types with kcat is accepted, and everything else gets a clear reason."""

from __future__ import annotations

import json

import numpy as np
import pytest

from colstream.schemas import (
    DocumentRef,
    InvalidRecord,
    PageVectors,
    decode_page_message,
    decode_upload,
    decode_vectors,
    encode,
)
from colstream.schemas.jsonschema import SCHEMA_DIR, render_schemas


def test_minimal_hand_typed_upload_is_accepted() -> None:
    event = decode_upload("inv-1", b'{"document_id": "inv-1", "blob_uri": "file:///data/inv-1.pdf"}')
    assert event is not None
    assert event.schema_version == 1 and event.filename is None
    assert event.display_name() == "inv-1.pdf"


def test_tombstone_decodes_to_a_delete() -> None:
    assert decode_upload("inv-1", None) is None


@pytest.mark.parametrize(
    ("key", "value", "error_type", "hint"),
    [
        ("a", b"{oops", "InvalidJSON", "not valid UTF-8 JSON"),
        ("a", b"\xff\xfe", "InvalidJSON", "not valid UTF-8 JSON"),
        ("a", b"[1, 2]", "InvalidEvent", "JSON object"),
        ("a", b'{"blob_uri": "file:///x"}', "InvalidEvent", "document_id"),
        ("a", b'{"document_id": "a"}', "InvalidEvent", "blob_uri"),
        ("a", b'{"document_id": "a", "blob_uri": "file:///x", "schema_version": 7}', "UnsupportedSchemaVersion", "7"),
        ("b", b'{"document_id": "a", "blob_uri": "file:///x"}', "KeyMismatch", "does not match"),
        (None, b'{"document_id": "a", "blob_uri": "file:///x"}', "MissingKey", "key"),
        ("a", b'{"document_id": "a", "blob_uri": "gopher://x"}', "InvalidEvent", "blob_uri"),
        ("a", b'{"document_id": "a", "blob_url": "file:///x"}', "InvalidEvent", "blob_url"),
        ("../x", b'{"document_id": "../x", "blob_uri": "file:///x"}', "InvalidEvent", "document_id"),
        (None, None, "MissingKey", "tombstone"),
    ],
)
def test_invalid_uploads_get_a_clear_reason(key: str | None, value: bytes | None, error_type: str, hint: str) -> None:
    with pytest.raises(InvalidRecord) as info:
        decode_upload(key, value)
    assert info.value.error_type == error_type
    assert hint in str(info.value)


def test_page_vectors_round_trip_as_float16_and_refuse_nan() -> None:
    array = np.random.default_rng(0).normal(size=(7, 128)).astype(np.float32)
    ref = DocumentRef(document_id="d", version=3)
    message = PageVectors.from_array(document=ref, page_number=1, total_pages=1, model="m", array=array)
    decoded = decode_vectors(encode(message))
    assert isinstance(decoded, PageVectors)
    back = decoded.to_array()
    assert back.dtype == np.float16 and back.shape == (7, 128)
    assert np.abs(back.astype(np.float32) - array).max() < 1e-2
    bad = array.copy()
    bad[2, 5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        PageVectors.from_array(document=ref, page_number=1, total_pages=1, model="m", array=bad)


def test_page_vectors_refuse_values_that_overflow_float16() -> None:
    # Finite in float32, inf once on the topic: the embedder's check sees what it publishes.
    array = np.ones((3, 8), dtype=np.float32)
    array[1, 2] = 1e6
    with pytest.raises(ValueError, match="NaN or inf"):
        PageVectors.from_array(document=DocumentRef(document_id="d", version=1), page_number=1, total_pages=1,
                               model="m", array=array)


def test_pages_topic_rejects_unknown_message_types() -> None:
    with pytest.raises(InvalidRecord, match="invalid pages-topic message"):
        decode_page_message(json.dumps({"type": "mystery"}).encode())


def test_committed_json_schemas_match_the_models() -> None:
    for filename, text in render_schemas().items():
        committed = (SCHEMA_DIR / filename).read_text()
        assert committed == text, f"{filename} is stale: run python -m colstream.schemas.jsonschema"
    upload = json.loads((SCHEMA_DIR / "upload-event.json").read_text())
    assert set(upload["required"]) == {"document_id", "blob_uri"}
