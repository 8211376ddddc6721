"""Office, HTML and text documents to PDF with LibreOffice headless, before the PDF path renders them.

What this module guarantees before LibreOffice sees a byte:

* the format is sniffed from the content (ZIP central directory, OLE compound file
  streams, RTF/HTML/text signatures), never from the name or declared type;
* ZIP containers are checked against entry-count, expanded-size and ratio limits
  (zip bombs), and password-protected Office files (OLE with ``EncryptionInfo``)
  are refused as ``EncryptedDocument``.

Each conversion runs ``soffice`` with its converter slot's own user profile, in a new
network namespace when ``unshare -n`` works here (nothing can be fetched), under an
address-space limit and a wall-clock timeout. A slot's profile is thrown away after
``recycle_after`` conversions or any failure.
"""

from __future__ import annotations

import contextlib
import os
import queue
import resource
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import olefile  # type: ignore[import-untyped]

from colstream.consumers.splitter.render import DocumentError, DocumentKind, read_head, sniff_kind
from colstream.infra.settings import ConverterSettings

OfficeFormat = Literal["docx", "pptx", "xlsx", "odt", "odp", "ods", "doc", "ppt", "xls", "rtf", "html", "text"]


class ConversionTimeout(DocumentError):
    def __init__(self, error_type: str = "ConversionTimeout", message: str = "the conversion timed out") -> None:
        super().__init__(error_type, message)


class ConversionFailed(DocumentError):
    def __init__(self, error_type: str = "ConversionFailed", message: str = "the conversion failed") -> None:
        super().__init__(error_type, message)


class ArchiveTooLarge(DocumentError):
    def __init__(self, error_type: str = "ArchiveTooLarge", message: str = "the archive expands too much") -> None:
        super().__init__(error_type, message)


class EncryptedDocument(DocumentError):
    def __init__(self, error_type: str = "EncryptedDocument", message: str = "the document is encrypted") -> None:
        super().__init__(error_type, message)


_ZIP_MAIN_PARTS: dict[str, OfficeFormat] = {
    "word/document.xml": "docx",
    "ppt/presentation.xml": "pptx",
    "xl/workbook.xml": "xlsx",
}
_ODF_MIMETYPES: dict[bytes, OfficeFormat] = {
    b"application/vnd.oasis.opendocument.text": "odt",
    b"application/vnd.oasis.opendocument.presentation": "odp",
    b"application/vnd.oasis.opendocument.spreadsheet": "ods",
}
_OLE_STREAMS: dict[str, OfficeFormat] = {
    "WordDocument": "doc", "PowerPoint Document": "ppt", "Workbook": "xls", "Book": "xls",
}
_NOT_TEXT_DOCUMENTS = (b"%!PS", b"<?xml", b"<svg")


def sniff_office_format(path: Path, settings: ConverterSettings) -> OfficeFormat | None:
    """The convertible format of ``path``, or None when it is none of them.

    Raises :class:`ArchiveTooLarge`, :class:`EncryptedDocument` or ``BrokenDocument``.
    """
    with path.open("rb") as handle:
        head = handle.read(8192)
    if head.startswith(b"PK\x03\x04"):
        return _sniff_zip(path, settings)
    if head.startswith(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"):
        return _sniff_ole(path)
    if head.startswith(b"{\\rtf"):
        return "rtf"
    stripped = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    lowered = stripped[:64].lower()
    if lowered.startswith((b"<!doctype html", b"<html")):
        return "html"
    if not stripped or stripped.startswith(_NOT_TEXT_DOCUMENTS) or b"\x00" in head:
        return None
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # a multi-byte character cut at the window's end is fine
            return None
    return "text"


def _sniff_zip(path: Path, settings: ConverterSettings) -> OfficeFormat | None:
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            _check_archive_limits(infos, settings)
            names = {info.filename for info in infos}
            if "mimetype" in names:
                mimetype = archive.read("mimetype").strip()
                if mimetype in _ODF_MIMETYPES:
                    return _ODF_MIMETYPES[mimetype]
            if "[Content_Types].xml" in names:
                for part, office_format in _ZIP_MAIN_PARTS.items():
                    if part in names:
                        return office_format
    except zipfile.BadZipFile as exc:
        raise DocumentError(
            "BrokenDocument", f"the file starts like a ZIP (Office) archive but its directory is unreadable: {exc}"
        ) from None
    return None


def _check_archive_limits(infos: list[zipfile.ZipInfo], settings: ConverterSettings) -> None:
    if len(infos) > settings.max_archive_entries:
        raise ArchiveTooLarge(
            "ArchiveTooLarge",
            f"the archive holds {len(infos):,} entries, above the {settings.max_archive_entries:,}-entry limit",
        )
    expanded = sum(info.file_size for info in infos)
    compressed = sum(info.compress_size for info in infos)
    if expanded > settings.max_archive_uncompressed_bytes:
        raise ArchiveTooLarge(
            "ArchiveTooLarge",
            f"the archive expands to {expanded:,} bytes, above the "
            f"{settings.max_archive_uncompressed_bytes:,}-byte limit (zip bomb guard)",
        )
    if expanded > 1024 * 1024 and expanded > settings.max_archive_ratio * max(1, compressed):
        raise ArchiveTooLarge(
            "ArchiveTooLarge",
            f"the archive expands {expanded / max(1, compressed):,.0f}x, above the "
            f"{settings.max_archive_ratio:g}x ratio limit (zip bomb guard)",
        )


def _sniff_ole(path: Path) -> OfficeFormat | None:
    try:
        with olefile.OleFileIO(str(path)) as ole:
            streams = {"/".join(entry) for entry in ole.listdir(streams=True, storages=False)}
    except OSError as exc:
        raise DocumentError("BrokenDocument", f"the OLE compound file is damaged: {exc}") from None
    if "EncryptionInfo" in streams or "EncryptedPackage" in streams:
        raise EncryptedDocument(
            "EncryptedDocument",
            "the Office document is protected by a password needed to open it; upload a copy without the password",
        )
    for stream, office_format in _OLE_STREAMS.items():
        if stream in streams:
            return office_format
    return None


# ---------------------------------------------------------------------------
# Converting


# Text is read as UTF-8 whatever the platform's locale. Every other format, HTML included, is
# detected by LibreOffice from the file (named after the sniffed format), so it is paginated
# exactly as a plain `soffice --convert-to pdf` paginates it.
_FILTERS: dict[OfficeFormat, str] = {"text": "txt:Text (encoded):UTF8"}
# Macros never run, links are never updated and external images are never fetched.
_LOCKED_CONFIG: list[tuple[str, str, str]] = [
    ("org.openoffice.Office.Common/Security/Scripting", "MacroSecurityLevel", "3"),
    ("org.openoffice.Office.Common/Security/Scripting", "DisableMacrosExecution", "true"),
    ("org.openoffice.Office.Common/Security/Scripting", "BlockUntrustedRefererLinks", "true"),
    ("org.openoffice.Office.Writer/Content/Update", "Link", "2"),
    ("org.openoffice.Office.Calc/Content/Update", "Link", "1"),
    # Without a network namespace, every HTTP(S) fetch goes to a closed local port.
    ("org.openoffice.Inet/Settings", "ooInetProxyType", "2"),
    ("org.openoffice.Inet/Settings", "ooInetHTTPProxyName", "127.0.0.1"),
    ("org.openoffice.Inet/Settings", "ooInetHTTPProxyPort", "9"),
    ("org.openoffice.Inet/Settings", "ooInetHTTPSProxyName", "127.0.0.1"),
    ("org.openoffice.Inet/Settings", "ooInetHTTPSProxyPort", "9"),
]
_PROFILE_CONFIG = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<oor:items xmlns:oor="http://openoffice.org/2001/registry">\n'
    + "".join(
        f'<item oor:path="/{path}"><prop oor:name="{name}"><value>{value}</value></prop></item>\n'
        for path, name, value in _LOCKED_CONFIG
    )
    + "</oor:items>\n"
)


def soffice_available(settings: ConverterSettings) -> bool:
    return shutil.which(settings.soffice) is not None


def _network_isolation_available() -> bool:
    unshare = shutil.which("unshare")
    if unshare is None:
        return False
    return subprocess.run([unshare, "-n", "true"], capture_output=True, check=False).returncode == 0


@dataclass
class _Slot:
    index: int
    profile: Path
    conversions: int = 0


@dataclass(frozen=True, slots=True)
class ConversionStats:
    """What one conversion cost: wall time and the converter process's peak resident memory."""

    seconds: float
    peak_rss_bytes: int


class OfficeConverter:
    """A pool of converter slots, each with its own LibreOffice user profile.

    A slot runs one ``soffice`` process at a time, for one conversion; callers on other
    threads wait for a free slot. A slot's profile is thrown away and made anew after
    ``recycle_after`` conversions or after any failure (timeout, crash, no PDF), so a
    profile a hostile document damaged never serves the next one.
    """

    def __init__(self, settings: ConverterSettings, work_dir: Path | None = None) -> None:
        self.settings = settings
        self._root = Path(tempfile.mkdtemp(prefix="colstream-convert-", dir=work_dir))
        self._isolated = _network_isolation_available()
        self._free: queue.Queue[_Slot] = queue.Queue()
        for index in range(settings.processes):
            self._free.put(self._new_slot(index))
        self._lock = threading.Lock()
        self.recycled = 0
        self.conversions = 0
        self.last_stats: ConversionStats | None = None

    @property
    def network_isolated(self) -> bool:
        """True when every conversion runs in its own empty network namespace (``unshare -n``)."""
        return self._isolated

    def _new_slot(self, index: int) -> _Slot:
        profile = self._root / f"profile-{index}-{os.urandom(4).hex()}"
        user = profile / "user"
        user.mkdir(parents=True)
        (user / "registrymodifications.xcu").write_text(_PROFILE_CONFIG)
        return _Slot(index, profile)

    def _recycled(self, slot: _Slot) -> _Slot:
        shutil.rmtree(slot.profile, ignore_errors=True)
        with self._lock:
            self.recycled += 1
        return self._new_slot(slot.index)

    def close(self) -> None:
        shutil.rmtree(self._root, ignore_errors=True)

    def __enter__(self) -> OfficeConverter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def to_pdf(self, path: Path, office_format: OfficeFormat) -> Iterator[Path]:
        """Convert ``path``; yields the PDF (removed afterwards). Raises a :class:`DocumentError`."""
        if not soffice_available(self.settings):
            raise ConversionFailed(
                "ConverterUnavailable",
                "LibreOffice (soffice) is not installed here, so this format cannot be converted",
            )
        slot = self._free.get()
        out_dir = Path(tempfile.mkdtemp(dir=self._root, prefix="out-"))
        try:
            try:
                pdf = self._run(slot, path, office_format, out_dir)
            except DocumentError:
                slot = self._recycled(slot)
                raise
            finally:
                self._free.put(self._after_conversion(slot))
            yield pdf
        finally:
            shutil.rmtree(out_dir, ignore_errors=True)

    def _after_conversion(self, slot: _Slot) -> _Slot:
        """The slot to put back: counted, and recycled once it has served ``recycle_after`` conversions."""
        slot.conversions += 1
        with self._lock:
            self.conversions += 1
        return self._recycled(slot) if slot.conversions >= self.settings.recycle_after else slot

    def _command(self, slot: _Slot, source: Path, office_format: OfficeFormat, out_dir: Path) -> list[str]:
        command = [
            self.settings.soffice, f"-env:UserInstallation={slot.profile.as_uri()}", "--headless", "--norestore",
            "--nolockcheck", "--nodefault", "--nologo",
        ]
        if office_format in _FILTERS:
            command.append(f"--infilter={_FILTERS[office_format].split(':', 1)[1]}")
        command += ["--convert-to", "pdf", "--outdir", str(out_dir), str(source)]
        return ["unshare", "-n", *command] if self._isolated else command

    def _run(self, slot: _Slot, path: Path, office_format: OfficeFormat, out_dir: Path) -> Path:
        # The name LibreOffice sees is ours, never the sender's.
        source = out_dir / f"document.{office_format}"
        os.link(path, source) if path.stat().st_dev == out_dir.stat().st_dev else shutil.copyfile(path, source)
        limit = self.settings.memory_bytes

        def limit_memory() -> None:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

        started = time.monotonic()
        proc = subprocess.Popen(
            self._command(slot, source, office_format, out_dir), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=limit_memory, start_new_session=True,
        )
        try:
            _, stderr = proc.communicate(timeout=self.settings.timeout_s)
        except subprocess.TimeoutExpired:
            raise ConversionTimeout(
                "ConversionTimeout",
                f"converting the document took longer than {self.settings.timeout_s:g}s and was abandoned",
            ) from None
        finally:
            # soffice is a launcher: the converting process is a grandchild. The whole
            # process group goes, whatever happened.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.last_stats = ConversionStats(time.monotonic() - started, usage.ru_maxrss * 1024)
        pdf = out_dir / "document.pdf"
        if proc.returncode != 0 or not pdf.exists() or pdf.stat().st_size == 0:
            lines = stderr.decode("utf-8", "replace").strip().splitlines()
            detail = lines[-1:] or [f"exit code {proc.returncode}"]
            raise ConversionFailed(
                "ConversionFailed", f"LibreOffice could not convert the {office_format} document to PDF: {detail[0]}"
            )
        return pdf


# ---------------------------------------------------------------------------
# From an uploaded file to something the PDF/image path renders


@contextlib.contextmanager
def renderable(
    path: Path, content_type: str | None, filename: str | None, converter: OfficeConverter | None
) -> Iterator[tuple[Path, DocumentKind]]:
    """The file the render path opens and its kind: ``path`` itself for a PDF or an image,
    else the PDF LibreOffice exports from an Office, HTML or text document (removed when the
    block ends). The bytes decide; ``content_type`` and ``filename`` only colour messages.

    Raises :class:`DocumentError`: ``UnsupportedFormat`` when the content is none of these
    (or no ``converter`` is given), the sniffing refusals, or a conversion failure.
    """
    office_format: OfficeFormat | None = None
    try:
        kind = sniff_kind(read_head(path), content_type, filename)
    except DocumentError as refused:
        if refused.error_type != "UnsupportedFormat" or converter is None:
            raise
        office_format = sniff_office_format(path, converter.settings)
        if office_format is None:
            raise
    if office_format is None:
        yield path, kind
        return
    assert converter is not None
    with converter.to_pdf(path, office_format) as pdf:
        yield pdf, "pdf"
