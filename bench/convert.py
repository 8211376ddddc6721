"""Office conversion throughput and memory, against plain ``soffice --convert-to pdf`` calls.

    .venv/bin/python bench/convert.py [--quick]

Measured on a mixed Office corpus (DOCX, ODT, RTF, PPTX, XLSX, HTML, Markdown; each of known
length), on the same cores, in the same run, alternating A B A B so machine drift hits both:

* ``converter``: :class:`OfficeConverter` as the splitter runs it (sniffing and zip-bomb checks,
  its own profile per slot, ``unshare -n``, RLIMIT_AS, timeout, process-group cleanup),
  ``PROCESSES`` slots fed by as many threads; pages counted by opening the PDF.
* ``plain soffice``: ``soffice --headless --convert-to pdf`` on the same files, ``PROCESSES``
  at a time, each with its own warm profile; no sniffing, no sandbox.
* ``office -> pages``: the splitter's whole path for the same files (convert, then render every
  page at the model's size in the render workers), against ``pdf -> pages``: the same pages as
  PDFs LibreOffice exported beforehand, rendered by the same workers (the PDF baseline).

Also reported: the peak resident memory of one converter process (the largest LibreOffice
process seen, from ``getrusage(RUSAGE_CHILDREN)``).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from _common import Report, Row, alternate, log, pairwise_ratios, spread

from colstream.consumers.splitter.convert import OfficeConverter, renderable, sniff_office_format
from colstream.consumers.splitter.render import PlainTarget, open_document
from colstream.consumers.splitter.workers import StreamingRenderer
from colstream.infra.settings import ConverterSettings, LimitSettings
from tests.fixtures import office

PROCESSES = 2
TARGET = PlainTarget(max_pixels=768 * 28 * 28)


def _corpus(directory: Path) -> list[Path]:
    files = {
        "report.docx": office.make_docx(3),
        "notes.odt": office.make_odt(2),
        "memo.rtf": office.make_rtf(2),
        "deck.pptx": office.make_pptx(4),
        "ledger.xlsx": office.make_xlsx(200),
        "page.html": b"<html><body>" + b"<p>A paragraph of HTML text.</p>" * 80 + b"</body></html>",
        "README.md": b"# Title\n\n" + b"Some *Markdown* text.\n\n" * 60,
    }
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in files.items():
        path = directory / name
        path.write_bytes(data)
        paths.append(path)
    return paths


def _in_parallel(items: list[Path], work: Callable[[Path], int], workers: int) -> int:
    """Run ``work`` over ``items`` on ``workers`` threads; the sum of what it returned."""
    pending = list(items)
    total = [0]
    lock = threading.Lock()

    def loop() -> None:
        while True:
            with lock:
                if not pending:
                    return
                item = pending.pop()
            count = work(item)
            with lock:
                total[0] += count

    threads = [threading.Thread(target=loop) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return total[0]


def _pages(pdf: Path) -> int:
    return open_document(pdf, "pdf", LimitSettings()).page_count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats (~2 min)")
    args = parser.parse_args()
    repeats = 3 if args.quick else 7
    scratch = Path(tempfile.mkdtemp(prefix="colstream-bench-convert-"))
    settings = ConverterSettings(processes=PROCESSES, timeout_s=120)
    files = _corpus(scratch / "corpus")
    formats = {path: sniff_office_format(path, settings) for path in files}
    assert all(formats.values()), formats

    converter = OfficeConverter(settings, work_dir=scratch)
    plain_profiles = [scratch / f"plain-profile-{n}" for n in range(PROCESSES)]
    free_profiles = list(plain_profiles)
    profile_lock = threading.Lock()

    def convert(path: Path) -> int:
        office_format = formats[path]
        assert office_format is not None
        with converter.to_pdf(path, office_format) as pdf:
            return _pages(pdf)

    def plain(path: Path) -> int:
        with profile_lock:
            profile = free_profiles.pop()
        try:
            out = Path(tempfile.mkdtemp(dir=scratch, prefix="plain-out-"))
            subprocess.run(
                ["soffice", f"-env:UserInstallation={profile.as_uri()}", "--headless", "--norestore",
                 "--convert-to", "pdf", "--outdir", str(out), str(path)],
                check=True, capture_output=True, timeout=120,
            )
            pages = _pages(out / f"{path.stem}.pdf")
            shutil.rmtree(out)
            return pages
        finally:
            with profile_lock:
                free_profiles.append(profile)

    renderer = StreamingRenderer(PROCESSES, LimitSettings())
    exported = scratch / "exported"
    exported.mkdir()
    try:
        # Warm-up: every profile made, LibreOffice's files in the page cache, render pool started.
        pages_per_run = _in_parallel(files, convert, PROCESSES)
        assert _in_parallel(files, plain, PROCESSES) == pages_per_run
        for path in files:
            with renderable(path, None, path.name, converter) as (pdf, _):
                shutil.copyfile(pdf, exported / f"{path.stem}.pdf")
        log(f"{len(files)} documents, {pages_per_run} pages per run, {PROCESSES} converter processes")

        def timed(name: str, work: Callable[[Path], int]) -> tuple[Callable[[], float], list[float]]:
            docs_rates: list[float] = []

            def run() -> float:
                t0 = time.perf_counter()
                assert _in_parallel(files, work, PROCESSES) == pages_per_run
                elapsed = time.perf_counter() - t0
                docs_rates.append(len(files) / elapsed)
                log(f"{name:15s} {len(files) / elapsed:.2f} docs/s, {pages_per_run / elapsed:.2f} pages/s")
                return pages_per_run / elapsed

            return run, docs_rates

        run_converter, converter_docs = timed("converter", convert)
        run_plain, plain_docs = timed("plain soffice", plain)
        converter_pages, plain_pages = alternate(repeats, run_converter, run_plain)

        def office_to_pages() -> float:
            t0 = time.perf_counter()
            rendered = 0
            for path in files:
                with renderable(path, None, path.name, converter) as (pdf, kind):
                    info = renderer.inspect(pdf, kind)
                    rendered += sum(1 for _ in renderer.render_document(pdf, kind, info.page_count, TARGET))
            assert rendered == pages_per_run
            rate = rendered / (time.perf_counter() - t0)
            log(f"office -> pages {rate:.2f} pages/s")
            return rate

        def pdf_to_pages() -> float:
            t0 = time.perf_counter()
            rendered = 0
            for path in files:
                pdf = exported / f"{path.stem}.pdf"
                info = renderer.inspect(pdf, "pdf")
                rendered += sum(1 for _ in renderer.render_document(pdf, "pdf", info.page_count, TARGET))
            assert rendered == pages_per_run
            rate = rendered / (time.perf_counter() - t0)
            log(f"pdf -> pages    {rate:.2f} pages/s")
            return rate

        office_rates, pdf_rates = alternate(repeats, office_to_pages, pdf_to_pages)
    finally:
        renderer.close()
        converter.close()
        peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        shutil.rmtree(scratch, ignore_errors=True)

    c, p = spread(converter_pages), spread(plain_pages)
    cd, pd = spread(converter_docs), spread(plain_docs)
    o, f = spread(office_rates), spread(pdf_rates)
    paired = pairwise_ratios(converter_pages, plain_pages)
    report = Report("convert", "python bench/convert.py" + (" --quick" if args.quick else ""))
    report.add(Row("converter / plain soffice (pairwise, median)", paired.median, "x", None, "", "", None,
                   f"min {paired.min:.3f}, max {paired.max:.3f}"))
    report.add(Row("converter (docs/s, median)", cd.median, "docs/s", pd.median, "plain soffice --convert-to pdf",
                   "", None, f"converter min {cd.min:.2f}, plain min {pd.min:.2f}"))
    report.add(Row("converter (pages/s, median)", c.median, "pages/s", p.median, "plain soffice --convert-to pdf",
                   "", None, f"converter min {c.min:.2f}, plain min {p.min:.2f}"))
    report.add(Row("office -> rendered pages (pages/s, median)", o.median, "pages/s", f.median,
                   "same pages as PDF, same render workers", "", None, f"office min {o.min:.2f}, pdf min {f.min:.2f}"))
    report.add(Row("peak RSS of one converter process", peak_rss / 2**20, "MiB", None, "", "", None,
                   f"RLIMIT_AS {settings.memory_bytes / 2**30:g} GiB per process"))
    report.details = {
        "documents": [path.name for path in files], "pages_per_run": pages_per_run, "processes": PROCESSES,
        "converter_pages_per_s": vars(c), "plain_pages_per_s": vars(p), "converter_docs_per_s": vars(cd),
        "plain_docs_per_s": vars(pd), "office_to_pages_per_s": vars(o), "pdf_to_pages_per_s": vars(f),
        "pairwise_ratio": vars(paired), "peak_rss_bytes": peak_rss,
    }
    report.print_and_save()


if __name__ == "__main__":
    main()
