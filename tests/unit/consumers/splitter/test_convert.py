"""Office/HTML/text conversion: content sniffing, zip-bomb and encryption refusals before
LibreOffice sees the file, and real conversions whose page counts match LibreOffice's own export."""

from __future__ import annotations

import io
import subprocess
import time
import zipfile
from pathlib import Path
from typing import Any

import olefile  # type: ignore[import-untyped]
import pypdfium2 as pdfium
import pytest

from colstream.consumers.splitter.convert import OfficeConverter, sniff_office_format, soffice_available
from colstream.consumers.splitter.render import DocumentError
from colstream.infra.settings import ConverterSettings
from tests.fixtures import docs, office

SETTINGS = ConverterSettings(timeout_s=120)
_soffice_missing = pytest.mark.skipif(
    not soffice_available(SETTINGS), reason="LibreOffice (soffice) is not installed; scripts/bootstrap.sh installs it"
)


def needs_soffice(test: Any) -> Any:
    """Conversions through the real LibreOffice take seconds each: they run in the full suite
    (``scripts/test.sh``, CI), not in the quick tier, and are skipped where soffice is missing."""
    return pytest.mark.slow(_soffice_missing(test))


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


@pytest.mark.slow  # deflates 600 MB of zeros to build the bomb
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


class _Recorder:
    """A loopback HTTP server owned by the test; ``requests`` lists every path asked for."""

    def __init__(self) -> None:
        import http.server
        import threading

        self.requests: list[str] = []
        requests = self.requests

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                requests.append(self.path)
                self.send_response(404)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/{name}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _remote_image_document(kind: str, url: str) -> tuple[str, bytes]:
    if kind == "html":
        return "page.html", f'<html><body><p>hi</p><img src="{url}"></body></html>'.encode()
    if kind == "docx":
        return "linked.docx", office.make_docx(1, remote_image=url)
    return "linked.odt", office.make_odt(1, remote_image=url)


@needs_soffice
@pytest.mark.parametrize("kind", ["html", "docx", "odt"])
def test_a_remote_image_is_never_fetched(tmp_path: Path, kind: str) -> None:
    recorder = _Recorder()
    try:
        name, data = _remote_image_document(kind, recorder.url(f"{kind}.png"))
        source = _write(tmp_path, name, data)
        office_format = sniff_office_format(source, SETTINGS)
        assert office_format is not None
        with OfficeConverter(SETTINGS, work_dir=tmp_path) as converter, converter.to_pdf(source, office_format) as pdf:
            assert _pages(pdf) >= 1  # converted, with the image left as a placeholder
        # Control: the same file through a plain LibreOffice (default profile, host network)
        # does fetch the image, so the silence above is the converter's doing.
        subprocess.run(
            ["soffice", f"-env:UserInstallation={(tmp_path / 'plain-profile').as_uri()}", "--headless",
             "--convert-to", "pdf", "--outdir", str(tmp_path / "plain"), str(source)],
            check=True, capture_output=True, timeout=120,
        )
        fetched_by_plain_libreoffice = list(recorder.requests)
    finally:
        recorder.close()
    assert fetched_by_plain_libreoffice, "the fixture does not link a remote image"
    # Everything asked for came from the control run alone.
    assert set(fetched_by_plain_libreoffice) == {f"/{kind}.png"}


@needs_soffice
def test_conversions_run_without_network_and_with_macros_locked_off(tmp_path: Path) -> None:
    with OfficeConverter(SETTINGS, work_dir=tmp_path) as converter:
        assert converter.network_isolated  # unshare -n works here (the tests run as root)
        marker = tmp_path / "macro-ran.txt"
        source = _write(tmp_path, "invoice.odt", office.make_macro_odt(marker))
        assert sniff_office_format(source, SETTINGS) == "odt"
        with converter.to_pdf(source, "odt") as pdf:
            assert _pages(pdf) == 1
        assert not marker.exists()
        # The settings LibreOffice kept in the profile after the run (it rewrites the file).
        import xml.etree.ElementTree as ET

        oor = "{http://openoffice.org/2001/registry}"
        kept = {
            (item.get(f"{oor}path"), prop.get(f"{oor}name")): prop.findtext("value")
            for item in ET.parse(next(converter._root.glob("profile-*/user/registrymodifications.xcu"))).getroot()
            for prop in item.findall("prop")
        }
        scripting = "/org.openoffice.Office.Common/Security/Scripting"
        assert kept[(scripting, "DisableMacrosExecution")] == "true"
        assert kept[(scripting, "MacroSecurityLevel")] == "3"
        assert kept[("/org.openoffice.Office.Writer/Content/Update", "Link")] == "2"  # never update links


def _legacy(make, suffix: str, target: str):
    return lambda tmp_path: office.soffice_convert(make(), suffix, target, tmp_path / f"make-{target}")


# Every Office, HTML and text format the converter accepts, with the page count LibreOffice's own export gives it.
FORMATS = [
    ("docx", "three.docx", lambda tmp_path: office.make_docx(3), 3),
    ("doc", "two.doc", _legacy(lambda: office.make_docx(2), "docx", "doc"), 2),
    ("odt", "two.odt", lambda tmp_path: office.make_odt(2), 2),
    ("rtf", "three.rtf", lambda tmp_path: office.make_rtf(3), 3),
    ("pptx", "four.pptx", lambda tmp_path: office.make_pptx(4), 4),
    ("ppt", "two.ppt", _legacy(lambda: office.make_pptx(2), "pptx", "ppt"), 2),
    ("odp", "three.odp", _legacy(lambda: office.make_pptx(3), "pptx", "odp"), 3),
    ("xlsx", "ledger.xlsx", lambda tmp_path: office.make_xlsx(200), 5),
    ("xls", "ledger.xls", _legacy(lambda: office.make_xlsx(200), "xlsx", "xls"), None),
    ("ods", "ledger.ods", _legacy(lambda: office.make_xlsx(200), "xlsx", "ods"), None),
    ("html", "page.html", lambda tmp_path: b"<html><body>" + b"<p>para</p>" * 120 + b"</body></html>", None),
    ("text", "log.txt", lambda tmp_path: b"".join(b"line %d\n" % n for n in range(120)), 2),
    ("text", "notes.md", lambda tmp_path: b"# Title\n\n" + b"Some *text*.\n\n" * 80, None),
]


@needs_soffice
@pytest.mark.parametrize(("office_format", "name", "make", "pages"), FORMATS, ids=[f[1] for f in FORMATS])
def test_every_format_is_sniffed_and_paginated_as_libreoffice_exports_it(
    tmp_path: Path, office_format: str, name: str, make, pages: int | None
) -> None:
    source = _write(tmp_path, name, make(tmp_path))
    assert sniff_office_format(source, SETTINGS) == office_format
    reference_dir = tmp_path / "reference"
    subprocess.run(
        ["soffice", f"-env:UserInstallation={(tmp_path / 'ref-profile').as_uri()}", "--headless",
         "--convert-to", "pdf", "--outdir", str(reference_dir), str(source)],
        check=True, capture_output=True, timeout=120,
    )
    expected = _pages(reference_dir / f"{source.stem}.pdf")
    assert pages is None or expected == pages
    assert expected >= 1 if pages is None else True
    with OfficeConverter(SETTINGS, work_dir=tmp_path) as converter, converter.to_pdf(source, office_format) as pdf:
        assert _pages(pdf) == expected


# --- failures, with a stand-in for soffice (same command line, scripted behaviour) ---------------

_FAKE_SOFFICE = """#!/bin/sh
# Behaves like `soffice --convert-to pdf --outdir DIR FILE` according to FILE's first word.
for last; do :; done
outdir=""; prev=""
for arg; do [ "$prev" = "--outdir" ] && outdir="$arg"; prev="$arg"; done
stem=$(basename "$last"); stem="${stem%.*}"
echo "$$" >> "$PIDS"
case "$(head -c 5 "$last")" in
  hang*) sleep 60 & echo "$!" >> "$PIDS"; wait ;;
  crash) kill -SEGV $$ ;;
  zero*) cp "$ZERO_PDF" "$outdir/$stem.pdf" ;;
  *) cp "$GOOD_PDF" "$outdir/$stem.pdf" ;;
esac
"""


@pytest.fixture
def fake_soffice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ConverterSettings:
    script = tmp_path / "fake-soffice"
    script.write_text(_FAKE_SOFFICE)
    script.chmod(0o755)
    (tmp_path / "good.pdf").write_bytes(docs.make_pdf(2))
    (tmp_path / "zero.pdf").write_bytes(docs.make_zero_page_pdf())
    monkeypatch.setenv("GOOD_PDF", str(tmp_path / "good.pdf"))
    monkeypatch.setenv("ZERO_PDF", str(tmp_path / "zero.pdf"))
    monkeypatch.setenv("PIDS", str(tmp_path / "pids"))
    return ConverterSettings(soffice=str(script), timeout_s=2, recycle_after=3)


def _convert_and_open(converter: OfficeConverter, source: Path) -> int:
    from colstream.consumers.splitter.render import open_document
    from colstream.infra.settings import LimitSettings

    with converter.to_pdf(source, "text") as pdf:
        return open_document(pdf, "pdf", LimitSettings()).page_count


@pytest.mark.parametrize(
    ("content", "error_type"),
    [
        # Waits out the conversion timeout.
        pytest.param(b"hang please", "ConversionTimeout", marks=pytest.mark.slow),
        (b"crash", "ConversionFailed"),
        (b"zero pages", "ZeroPages"),
    ],
)
def test_a_failed_conversion_is_refused_with_its_reason_and_the_next_document_converts(
    tmp_path: Path, fake_soffice: ConverterSettings, content: bytes, error_type: str
) -> None:
    bad = _write(tmp_path, "bad.txt", content)
    good = _write(tmp_path, "good.txt", b"fine")
    with OfficeConverter(fake_soffice, work_dir=tmp_path) as converter:
        started = time.monotonic()
        with pytest.raises(DocumentError) as refused:
            _convert_and_open(converter, bad)
        assert refused.value.error_type == error_type
        assert time.monotonic() - started < fake_soffice.timeout_s + 5
        # A conversion that produced no usable PDF recycles the slot; a zero-page PDF is the
        # document's fault, found when the render path opens it.
        assert converter.recycled == (0 if error_type == "ZeroPages" else 1)
        assert _convert_and_open(converter, good) == 2


@pytest.mark.slow  # waits out the conversion timeout
def test_a_timed_out_conversion_leaves_no_process_behind(tmp_path: Path, fake_soffice: ConverterSettings) -> None:
    with OfficeConverter(fake_soffice, work_dir=tmp_path) as converter, pytest.raises(DocumentError):
        _convert_and_open(converter, _write(tmp_path, "bad.txt", b"hang"))
    pids = (tmp_path / "pids").read_text().split()
    assert len(pids) == 2  # the launcher and the grandchild doing the "work"
    time.sleep(0.2)
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue  # gone
        assert state in ("Z", "X"), f"process {pid} still running (state {state})"


def test_slots_are_recycled_after_n_conversions_and_each_has_its_own_profile(
    tmp_path: Path, fake_soffice: ConverterSettings
) -> None:
    import threading

    settings = fake_soffice.model_copy(update={"processes": 2})
    good = _write(tmp_path, "good.txt", b"fine")
    with OfficeConverter(settings, work_dir=tmp_path) as converter:
        profiles = {p.name for p in converter._root.glob("profile-*")}
        assert len(profiles) == 2
        # Three rounds of two conversions at once: the free slots are a FIFO, so a round's two
        # conversions take the two different slots and each slot serves exactly three. (Six
        # threads at once let a quick slot come back and serve a fourth while the other is
        # still busy; then only one slot reaches three.)
        for _ in range(3):
            threads = [threading.Thread(target=_convert_and_open, args=(converter, good)) for _ in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        assert converter.conversions == 6
        # 6 conversions over 2 slots, each recycled after 3: both profiles were replaced.
        assert converter.recycled == 2
        assert not profiles & {p.name for p in converter._root.glob("profile-*")}
