"""Office/HTML/text conversion: content sniffing, zip-bomb and encryption refusals before
LibreOffice sees the file, and real conversions whose page counts match LibreOffice's own export."""

from __future__ import annotations

import io
import subprocess
import zipfile
from pathlib import Path

import olefile  # type: ignore[import-untyped]
import pypdfium2 as pdfium
import pytest

from colstream.consumers.splitter.convert import OfficeConverter, sniff_office_format, soffice_available
from colstream.consumers.splitter.render import DocumentError
from colstream.infra.settings import ConverterSettings
from tests.fixtures import docs

SETTINGS = ConverterSettings(timeout_s=120)
needs_soffice = pytest.mark.skipif(
    not soffice_available(SETTINGS), reason="LibreOffice (soffice) is not installed; scripts/bootstrap.sh installs it"
)


def _docx(paragraphs: int) -> bytes:
    import docx

    document = docx.Document()
    for n in range(paragraphs):
        document.add_paragraph(f"Paragraph {n}")
        if n < paragraphs - 1:
            document.add_page_break()
    buffer = io.BytesIO()
    document.save(buffer)
    return buffer.getvalue()


def _pptx(slides: int) -> bytes:
    import pptx

    deck = pptx.Presentation()
    for n in range(slides):
        deck.slides.add_slide(deck.slide_layouts[1]).shapes.title.text = f"Slide {n}"
    buffer = io.BytesIO()
    deck.save(buffer)
    return buffer.getvalue()


def _xlsx() -> bytes:
    import openpyxl

    book = openpyxl.Workbook()
    book.active["A1"] = "total"
    buffer = io.BytesIO()
    book.save(buffer)
    return buffer.getvalue()


def _odt() -> bytes:
    from odf.opendocument import OpenDocumentText
    from odf.text import P

    document = OpenDocumentText()
    document.text.addElement(P(text="hello"))
    buffer = io.BytesIO()
    document.write(buffer)
    return buffer.getvalue()


def _zip_bomb() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("[Content_Types].xml", "<Types/>")
        archive.writestr("word/document.xml", b"\0" * (600 * 1024 * 1024 // 10))
        for n in range(9):
            archive.writestr(f"word/media/pad{n}.bin", b"\0" * (600 * 1024 * 1024 // 10))
    return buffer.getvalue()


def _encrypted_docx(tmp_path: Path) -> bytes:
    """An OLE compound file holding EncryptionInfo + EncryptedPackage, as Office writes a protected DOCX."""
    path = tmp_path / "template.ole"
    # olefile only edits existing streams: start from a compound file written by LibreOffice-free means.
    from tests.fixtures.office import write_ole

    write_ole(path, {"EncryptionInfo": b"\x04\x00\x04\x00" + b"\0" * 60, "EncryptedPackage": b"\0" * 512})
    assert olefile.isOleFile(str(path))
    return path.read_bytes()


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("name", "make", "expected"),
    [
        ("letter.pdf", lambda: _docx(2), "docx"),  # the name lies; the content decides
        ("deck", lambda: _pptx(1), "pptx"),
        ("sheet.docx", _xlsx, "xlsx"),
        ("a.odt", _odt, "odt"),
        ("r.txt", lambda: b"{\\rtf1\\ansi hello}", "rtf"),
        ("page.pdf", lambda: b"<!DOCTYPE html><html><body>hi</body></html>", "html"),
        ("notes.md", lambda: "# Title\n\nsome *text* \u00e9\n".encode(), "text"),
    ],
)
def test_formats_are_sniffed_from_content(tmp_path: Path, name: str, make, expected: str) -> None:
    assert sniff_office_format(_write(tmp_path, name, make()), SETTINGS) == expected


@pytest.mark.parametrize(
    "data",
    [docs.make_pdf(1), b"%!PS-Adobe-3.0\n", b'<?xml version="1.0"?><svg/>', bytes(range(256)) * 4, b" \n\t" * 10],
)
def test_non_documents_are_not_claimed(tmp_path: Path, data: bytes) -> None:
    assert sniff_office_format(_write(tmp_path, "x", data), SETTINGS) is None


def test_a_zip_bomb_is_refused_from_its_central_directory(tmp_path: Path) -> None:
    with pytest.raises(DocumentError) as refused:
        sniff_office_format(_write(tmp_path, "bomb.docx", _zip_bomb()), SETTINGS)
    assert refused.value.error_type == "ArchiveTooLarge"
    assert "zip bomb" in refused.value.message


def test_too_many_entries_and_truncated_zip_are_refused(tmp_path: Path) -> None:
    whole = _docx(1)
    with pytest.raises(DocumentError) as many:
        sniff_office_format(_write(tmp_path, "a.docx", whole), ConverterSettings(max_archive_entries=3))
    assert many.value.error_type == "ArchiveTooLarge"
    with pytest.raises(DocumentError) as cut:
        sniff_office_format(_write(tmp_path, "cut.docx", whole[: len(whole) // 2]), SETTINGS)
    assert cut.value.error_type == "BrokenDocument"


def test_a_password_protected_office_file_is_an_encrypted_document(tmp_path: Path) -> None:
    with pytest.raises(DocumentError) as refused:
        sniff_office_format(_write(tmp_path, "secret.docx", _encrypted_docx(tmp_path)), SETTINGS)
    assert refused.value.error_type == "EncryptedDocument"


def _pages(pdf: Path) -> int:
    document = pdfium.PdfDocument(str(pdf))
    try:
        return len(document)
    finally:
        document.close()


@needs_soffice
@pytest.mark.parametrize(
    ("name", "make", "pages"),
    [("three.docx", lambda: _docx(3), 3), ("two.pptx", lambda: _pptx(2), 2), ("notes.md", lambda: b"# hi\n", 1)],
)
def test_conversion_page_count_matches_libreoffice_export(tmp_path: Path, name: str, make, pages: int) -> None:
    source = _write(tmp_path, name, make())
    office_format = sniff_office_format(source, SETTINGS)
    assert office_format is not None
    reference_dir = tmp_path / "reference"
    subprocess.run(
        ["soffice", f"-env:UserInstallation={(tmp_path / 'ref-profile').as_uri()}", "--headless",
         "--convert-to", "pdf", "--outdir", str(reference_dir), str(source)],
        check=True, capture_output=True, timeout=120,
    )
    converter = OfficeConverter(ConverterSettings(timeout_s=120, recycle_after=2), work_dir=tmp_path)
    try:
        with converter.to_pdf(source, office_format) as pdf:
            assert _pages(pdf) == _pages(reference_dir / f"{source.stem}.pdf") == pages
    finally:
        converter.close()


@needs_soffice
def test_a_conversion_past_its_timeout_is_abandoned_and_the_slot_recycled(tmp_path: Path) -> None:
    source = _write(tmp_path, "a.docx", _docx(1))
    converter = OfficeConverter(ConverterSettings(timeout_s=0.05), work_dir=tmp_path)
    try:
        with pytest.raises(DocumentError) as refused, converter.to_pdf(source, "docx"):
            pass
        assert refused.value.error_type == "ConversionTimeout"
        assert converter.recycled == 1
    finally:
        converter.close()


@needs_soffice
def test_a_remote_image_is_never_fetched(tmp_path: Path) -> None:
    import http.server
    import threading

    requests: list[str] = []

    class Recorder(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requests.append(self.path)
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/tracker.png"
    source = _write(tmp_path, "page.html", f'<html><body><p>hi</p><img src="{url}"></body></html>'.encode())
    converter = OfficeConverter(ConverterSettings(timeout_s=120), work_dir=tmp_path)
    try:
        with converter.to_pdf(source, "html") as pdf:
            assert _pages(pdf) == 1
    finally:
        converter.close()
        server.shutdown()
    assert requests == []
