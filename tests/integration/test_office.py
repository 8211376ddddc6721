"""Office, HTML and text uploads end to end through `colstream run all` and the real broker.

Each document's indexed page count must equal the page count of LibreOffice's own PDF export
of the same file; hostile Office files end as dead letters with their exact reason, a remote
image is never fetched, and the converter recovers for the documents after them.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pypdfium2 as pdfium
import pytest

from colstream.consumers.splitter.convert import soffice_available
from colstream.infra.settings import ColstreamSettings
from tests.fixtures import office
from tests.harness import dead_letters, kcat_produce, upload_line, wait_for
from tests.integration.test_user_flows import documents, on_free_port, run_all
from tests.unit.consumers.splitter.test_convert import _Recorder

pytestmark = [
    pytest.mark.kafka,
    pytest.mark.skipif(not soffice_available(ColstreamSettings().converter), reason="LibreOffice is not installed"),
]


def _libreoffice_pages(path: Path, scratch: Path) -> int:
    """Pages of ``soffice --convert-to pdf`` on ``path``: the reference the pipeline must match."""
    out = scratch / "reference"
    subprocess.run(
        ["soffice", f"-env:UserInstallation={(scratch / 'ref-profile').as_uri()}", "--headless",
         "--convert-to", "pdf", "--outdir", str(out), str(path)],
        check=True, capture_output=True, timeout=180,
    )
    document = pdfium.PdfDocument(str(out / f"{path.stem}.pdf"))
    try:
        return len(document)
    finally:
        document.close()


def test_office_documents_are_indexed_with_libreoffices_page_counts_and_hostile_ones_dead_lettered(
    pipeline_settings: ColstreamSettings, tmp_path: Path
) -> None:
    settings = on_free_port(pipeline_settings)
    root = settings.blob.local_root
    recorder = _Recorder()
    marker = (tmp_path / "macro-ran.txt").resolve()
    good = {
        "memo-docx": ("memo.docx", office.make_docx(3, remote_image=recorder.url("docx.png"))),
        "notes-odt": ("notes.odt", office.make_odt(2, remote_image=recorder.url("odt.png"))),
        "letter-rtf": ("letter.rtf", office.make_rtf(2)),
        "deck-pptx": ("deck.pptx", office.make_pptx(4)),
        "ledger-xlsx": ("ledger.xlsx", office.make_xlsx(200)),
        "legacy-doc": ("legacy.doc", office.soffice_convert(office.make_docx(2), "docx", "doc", tmp_path / "doc")),
        "page-html": ("page.html", f'<html><body><p>hello</p><img src="{recorder.url("html.png")}"></body></html>'
                      .encode()),
        "readme-md": ("README.md", b"# Colstream\n\n" + b"A paragraph of *Markdown*.\n\n" * 60),
        "invoice-macro": ("invoice.odt", office.make_macro_odt(marker)),
    }
    hostile = {
        "secret-docx": ("secret.docx", office.make_encrypted_docx(tmp_path), "EncryptedDocument"),
        "bomb-docx": ("bomb.docx", office.make_zip_bomb(), "ArchiveTooLarge"),
        "cut-docx": ("cut.docx", office.make_docx(2)[:3000], "BrokenDocument"),
        "corners-xlsx": ("corners.xlsx", office.make_sparse_huge_xlsx(), "ConversionTimeout"),
    }
    expected_pages: dict[str, int] = {}
    lines = []
    for document_id, (name, data) in good.items():
        path = root / name
        path.write_bytes(data)
        expected_pages[document_id] = _libreoffice_pages(path, tmp_path / document_id)
        # Names and declared types are claims: the content decides, so the upload says "pdf".
        lines.append(upload_line(document_id, path.resolve().as_uri(), filename=f"{document_id}.pdf",
                                 content_type="application/pdf"))
    requests_before_pipeline = list(recorder.requests)
    recorder.requests.clear()
    for document_id, (name, data, _) in hostile.items():
        path = root / f"hostile-{name}"
        path.write_bytes(data)
        lines.append(upload_line(document_id, path.resolve().as_uri(), filename=name))
    after = root / "after.docx"
    after.write_bytes(office.make_docx(2))
    lines.append(upload_line("after-docx", after.resolve().as_uri(), filename="after.docx"))
    expected_pages["after-docx"] = 2

    try:
        with run_all(settings, tmp_path / "run-all.log", extra_env={"COLSTREAM_CONVERTER__TIMEOUT_S": "30"}):
            kcat_produce(settings, settings.topics.uploads, lines)
            listed = wait_for(
                lambda: (rows := documents(settings)) and all(
                    rows.get(d, {}).get("state") == "complete" for d in expected_pages) and rows,
                600, what="every Office document complete",
            )
            for document_id, pages in expected_pages.items():
                assert (document_id, listed[document_id]["total_pages"], listed[document_id]["indexed_pages"]) == (
                    document_id, pages, pages)
            letters = wait_for(
                lambda: (found := {d["document_id"]: d["error_type"] for d in dead_letters(settings)})
                and set(hostile) <= set(found) and found,
                120, what="dead letters for the hostile files",
            )
            assert {d: letters[d] for d in hostile} == {d: reason for d, (_, _, reason) in hostile.items()}
            assert set(letters) == set(hostile)  # nothing else was dead-lettered
    finally:
        recorder.close()
    assert requests_before_pipeline  # LibreOffice's plain export of the same files did fetch the images
    assert recorder.requests == []  # the pipeline's conversions never did
    assert not marker.exists()  # the macro never ran
