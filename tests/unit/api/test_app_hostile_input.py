"""The REST API against a hostile client: near-miss ids, unknown deletes, signed URIs."""

from __future__ import annotations

from tests.unit.api.test_app import PDF_BYTES, Api, api, record

__all__ = ["api"]


def test_trailing_newline_id_is_refused_on_upload_and_delete(api: Api) -> None:
    api.store.put(record("abc", 3, "complete"))
    upload = api.client.post(
        "/ingest/pdf",
        params={"wait": False},
        data={"document_id": "abc\n"},
        files={"file": ("a.pdf", PDF_BYTES, "application/pdf")},
    )
    assert upload.status_code == 422
    assert api.publisher.uploads == []
    deleted = api.client.delete("/document/abc%0A")
    assert deleted.status_code == 422
    assert api.publisher.deletes == []  # and above all not a tombstone for "abc"


def test_ids_the_store_cannot_hold_are_refused_by_the_contract(api: Api) -> None:
    for document_id in ("a//b", "a/", "a/./b"):
        response = api.client.post(
            "/ingest/pdf",
            params={"wait": False},
            data={"document_id": document_id},
            files={"file": ("a.pdf", PDF_BYTES, "application/pdf")},
        )
        assert response.status_code == 422, document_id
    assert api.publisher.uploads == []


def test_unknown_id_delete_is_404_and_publishes_nothing(api: Api) -> None:
    response = api.client.delete("/document/never-existed")
    assert response.status_code == 404
    assert api.publisher.deletes == []
    api.store.put(record("gone", 4, "deleted", total_pages=0))
    assert api.client.delete("/document/gone").status_code == 404
    assert api.publisher.deletes == []


def test_signed_uri_of_an_old_record_is_never_served(api: Api) -> None:
    api.store.put(
        record(
            "signed",
            2,
            "failed",
            blob_uri="https://acct.blob.core.windows.net/c/a.pdf?sv=1&sig=SECRET",
            filename="a.pdf?sv=1&sig=SECRET",
        )
    )
    for path in ("/documents", "/documents/signed"):
        response = api.client.get(path)
        assert response.status_code == 200
        assert "SECRET" not in response.text and "sig=" not in response.text
