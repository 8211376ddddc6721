"""The splitter's render core and its worker pool, against the hostile corpus and the size targets."""

from __future__ import annotations

import io
import math
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from colstream.consumers.splitter.convert import OfficeConverter
from colstream.consumers.splitter.render import (
    JPEG_MAX_SIDE,
    DocumentError,
    PageError,
    PageFailure,
    PlainTarget,
    RenderedPage,
    fit_size,
    open_document,
    render_page,
    sniff_kind,
)
from colstream.consumers.splitter.workers import StreamingRenderer
from colstream.infra.settings import ConverterSettings, LimitSettings
from tests.fixtures import docs, faults
from tests.fixtures.corpus import (
    MACRO_MARKER,
    CorpusCase,
    DeadLettered,
    Indexed,
    Prepared,
    build_corpus,
    observed_outcome,
    prepare_corpus,
)

COLQWEN2 = PlainTarget(max_pixels=768 * 28 * 28)
COLPALI = PlainTarget(min_side=448)
LIMITS = LimitSettings()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[CorpusCase]:
    return build_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def prepared(corpus: list[CorpusCase], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Prepared]:
    """Each case as the splitter hands it to the render path (Office files converted once)."""
    with OfficeConverter(ConverterSettings(timeout_s=30)) as converter:
        return prepare_corpus(corpus, converter, tmp_path_factory.mktemp("converted"))


@pytest.fixture(scope="module")
def renderer() -> StreamingRenderer:
    with StreamingRenderer(2, LimitSettings(render_timeout_s=20)) as pool:
        yield pool  # type: ignore[misc]


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _in_process_outcome(ready: Prepared, target: PlainTarget) -> Indexed | DeadLettered:
    results: list[RenderedPage | PageFailure] = []
    try:
        if isinstance(ready, DocumentError):
            raise ready
        path, kind = ready
        info = open_document(path, kind, LIMITS)
        for page_number in range(1, info.page_count + 1):
            try:
                results.append(render_page(path, kind, page_number, target, LIMITS))
            except PageError as exc:
                results.append(PageFailure(page_number, exc.error_type, exc.message))
    except DocumentError as exc:
        return observed_outcome(exc, [])
    return observed_outcome(None, results)


# --- the corpus ------------------------------------------------------------------------------


# The hostile corpus (built once per module, its Office files converted by LibreOffice) and the
# worker crash and timeout suites take minutes together: full suite only, not the quick tier.
@pytest.mark.slow
def test_corpus_is_big_and_covers_both_outcomes(corpus: list[CorpusCase]) -> None:
    assert len(corpus) >= 60
    assert len({c.name for c in corpus}) == len(corpus)
    dead = {c.expected.error_type for c in corpus if isinstance(c.expected, DeadLettered)}
    assert {
        "EmptyFile",
        "UnsupportedFormat",
        "EncryptedDocument",
        "BrokenDocument",
        "ZeroPages",
        "TooManyPages",
        "ImageTooLarge",
        "BrokenImage",
        "ArchiveTooLarge",
        "ConversionFailed",
        "ConversionTimeout",
    } <= dead
    assert any(isinstance(c.expected, Indexed) and c.expected.failed_pages for c in corpus)


@pytest.mark.slow
@pytest.mark.parametrize("target", [COLQWEN2, COLPALI], ids=["colqwen2", "colpali"])
def test_each_corpus_case_gets_its_expected_outcome_in_process(
    corpus: list[CorpusCase], prepared: dict[str, Prepared], target: PlainTarget
) -> None:
    mismatches = {
        case.name: (outcome, case.expected)
        for case in corpus
        if (outcome := _in_process_outcome(prepared[case.name], target)) != case.expected
    }
    assert mismatches == {}


@pytest.mark.slow
def test_no_macro_of_the_corpus_ran(corpus: list[CorpusCase], prepared: dict[str, Prepared]) -> None:
    assert any(case.name == "odt_macro" for case in corpus) and not isinstance(prepared["odt_macro"], DocumentError)
    assert not (corpus[0].data_path.parent / MACRO_MARKER).exists()


@pytest.mark.slow
def test_each_corpus_case_gets_its_expected_outcome_through_worker_processes(
    corpus: list[CorpusCase], prepared: dict[str, Prepared], renderer: StreamingRenderer
) -> None:
    mismatches = {}
    for case in corpus:
        results: list[RenderedPage | PageFailure] = []
        error = None
        try:
            ready = prepared[case.name]
            if isinstance(ready, DocumentError):
                raise ready
            path, kind = ready
            info = renderer.inspect(path, kind)
            results = list(renderer.render_document(path, kind, info.page_count, COLQWEN2))
            assert [r.page_number for r in results] == list(range(1, info.page_count + 1))
        except DocumentError as exc:
            error = exc
        outcome = observed_outcome(error, results)
        if outcome != case.expected:
            mismatches[case.name] = (outcome, case.expected)
    assert mismatches == {}
    # Nothing in the corpus hangs or crashes PDFium, so no worker had to be replaced.
    assert renderer.workers_replaced == 0


@pytest.mark.slow
def test_document_errors_carry_an_actionable_message(
    corpus: list[CorpusCase], prepared: dict[str, Prepared]
) -> None:
    refused = 0
    for case in corpus:
        if not isinstance(case.expected, DeadLettered):
            continue
        try:
            ready = prepared[case.name]
            if isinstance(ready, DocumentError):
                raise ready
            open_document(*ready, LIMITS)
        except DocumentError as exc:
            refused += 1
            assert exc.error_type == case.expected.error_type
            assert len(exc.message) > 30 and exc.error_type not in exc.message, exc.message
        else:
            # Opens fine; every page then fails (the outcome rule makes that a dead letter).
            assert case.expected.error_type in {"BrokenImage", "BrokenPage"}
    assert refused >= 15


# --- sniffing -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "content_type", "filename", "kind"),
    [
        (docs.make_pdf(1), "image/png", "scan.png", "pdf"),
        (b"\x00" * 500 + docs.make_pdf(1), None, None, "pdf"),  # junk before the header is legal
        (docs.make_image("PNG", size=(8, 8)), "application/pdf", "x.pdf", "image"),
        (docs.make_image("JPEG", size=(8, 8)), None, None, "image"),
        (docs.make_image("WEBP", size=(8, 8)), None, None, "image"),
        (docs.make_image("BMP", size=(8, 8)), None, None, "image"),
        (docs.make_image("GIF", size=(8, 8)), None, None, "image"),
        (docs.make_tiff(1, size=(8, 8)), None, None, "image"),
    ],
)
def test_sniff_kind_trusts_bytes_not_labels(
    data: bytes, content_type: str | None, filename: str | None, kind: str
) -> None:
    assert sniff_kind(data[:2048], content_type, filename) == kind


def test_sniff_kind_refuses_unknown_and_empty_content() -> None:
    with pytest.raises(DocumentError) as empty:
        sniff_kind(b"", "application/pdf", "a.pdf")
    assert empty.value.error_type == "EmptyFile"
    with pytest.raises(DocumentError) as html:
        sniff_kind(b"<!DOCTYPE html><html>", "application/pdf", "a.pdf")
    assert html.value.error_type == "UnsupportedFormat"
    assert "HTML" in html.value.message and "a.pdf" in html.value.message
    with pytest.raises(DocumentError) as text:
        sniff_kind(b"BMW annual report " * 4, None, None)
    assert text.value.error_type == "UnsupportedFormat"


# --- sizes ----------------------------------------------------------------------------------


@given(
    width=st.floats(min_value=1, max_value=200_000),
    height=st.floats(min_value=1, max_value=200_000),
    max_pixels=st.one_of(st.none(), st.integers(min_value=784, max_value=4_000_000)),
    min_side=st.one_of(st.none(), st.integers(min_value=28, max_value=1024)),
    max_side=st.one_of(st.none(), st.integers(min_value=64, max_value=4096)),
    upscale=st.booleans(),
)
@settings(max_examples=300, deadline=None)
def test_fit_size_never_exceeds_a_cap(
    width: float, height: float, max_pixels: int | None, min_side: int | None, max_side: int | None, upscale: bool
) -> None:
    target = PlainTarget(max_pixels=max_pixels, min_side=min_side, max_side=max_side)
    out_w, out_h = fit_size(width, height, target, upscale=upscale)
    assert out_w >= 1 and out_h >= 1
    assert max(out_w, out_h) <= JPEG_MAX_SIDE
    if max_pixels:
        assert out_w * out_h <= max_pixels
    if max_side:
        assert max(out_w, out_h) <= max_side
    if not upscale:
        assert out_w <= math.ceil(width) and out_h <= math.ceil(height)


def test_fit_size_fills_the_pixel_budget_and_meets_min_side() -> None:
    w, h = fit_size(612, 792, COLQWEN2, upscale=True)
    assert 0.99 * COLQWEN2.max_pixels <= w * h <= COLQWEN2.max_pixels  # type: ignore[operator]
    assert abs(w / h - 612 / 792) < 0.01
    assert min(fit_size(612, 792, COLPALI, upscale=True)) == 448
    assert fit_size(100, 50, COLPALI, upscale=False) == (100, 50)  # images are never enlarged
    # With a cap, min_side is only a floor and the cap wins.
    assert fit_size(612, 792, PlainTarget(max_pixels=602_112, min_side=28), upscale=True) == (w, h)


@pytest.mark.parametrize("size", [(612, 792), (842, 595), (72, 72), (200, 3000), (14_400, 14_400)])
@pytest.mark.parametrize("target", [COLQWEN2, COLPALI], ids=["colqwen2", "colpali"])
def test_pdf_render_is_the_size_the_model_consumes(tmp_path: Path, size: tuple[int, int], target: PlainTarget) -> None:
    path = _write(tmp_path, "p.pdf", docs.make_pdf(1, size=size))
    page = render_page(path, "pdf", 1, target, LIMITS)
    decoded = Image.open(io.BytesIO(page.data))
    assert decoded.format == "JPEG" and decoded.mode == "RGB"
    assert decoded.size == (page.width, page.height)
    if target.max_pixels:
        assert page.width * page.height <= target.max_pixels
        assert page.width * page.height >= 0.98 * target.max_pixels
    else:
        assert min(page.width, page.height) == target.min_side
    assert abs(page.width / page.height - size[0] / size[1]) < 0.02


def test_rotated_page_renders_landscape(tmp_path: Path) -> None:
    path = _write(tmp_path, "r.pdf", docs.make_pdf_from_specs([docs.PageSpec(), docs.PageSpec(rotate=90)]))
    upright = render_page(path, "pdf", 1, COLQWEN2, LIMITS)
    turned = render_page(path, "pdf", 2, COLQWEN2, LIMITS)
    assert upright.height > upright.width
    assert (turned.width, turned.height) == (upright.height, upright.width)


@pytest.mark.parametrize(
    ("data", "source_size"),
    [
        (docs.make_image("JPEG", size=(4000, 3000)), (4000, 3000)),
        (docs.make_image("PNG", size=(3000, 4000), mode="L"), (3000, 4000)),
        (docs.make_image("PNG", size=(300, 200)), (300, 200)),
    ],
)
def test_images_are_downscaled_to_the_target_never_enlarged(
    tmp_path: Path, data: bytes, source_size: tuple[int, int]
) -> None:
    path = _write(tmp_path, "img", data)
    page = render_page(path, "image", 1, COLQWEN2, LIMITS)
    assert page.width * page.height <= COLQWEN2.max_pixels  # type: ignore[operator]
    assert page.width <= source_size[0] and page.height <= source_size[1]
    assert abs(page.width / page.height - source_size[0] / source_size[1]) < 0.02


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    path = _write(tmp_path, "phone.jpg", docs.make_jpeg_with_exif_orientation((400, 200), orientation=6))
    page = render_page(path, "image", 1, COLQWEN2, LIMITS)
    assert (page.width, page.height) == (200, 400)


def _pixels(page: RenderedPage) -> np.ndarray:
    """(height, width, 3) uint8 of the encoded page."""
    return np.asarray(Image.open(io.BytesIO(page.data)).convert("RGB"))


def test_sixteen_bit_png_keeps_its_tones(tmp_path: Path) -> None:
    eight = render_page(_write(tmp_path, "8.png", docs.make_image("PNG", mode="L")), "image", 1, COLQWEN2, LIMITS)
    sixteen = render_page(_write(tmp_path, "16.png", docs.make_image("PNG", mode="I;16")), "image", 1, COLQWEN2, LIMITS)
    # Clipping 16-bit values to 8 bits would turn the whole page white.
    assert abs(float(_pixels(eight).mean()) - float(_pixels(sixteen).mean())) < 3


def test_alpha_is_flattened_on_white_and_cmyk_keeps_colour(tmp_path: Path) -> None:
    rgba = render_page(_write(tmp_path, "a.png", docs.make_image("PNG", mode="RGBA")), "image", 1, COLQWEN2, LIMITS)
    # make_image's alpha ramps from 0 at the left edge: fully transparent there.
    assert _pixels(rgba)[rgba.height // 2, 1].min() > 240
    cmyk = render_page(_write(tmp_path, "c.jpg", docs.make_image("JPEG", mode="CMYK")), "image", 1, COLQWEN2, LIMITS)
    # The red box of the sample drawing stays red after CMYK -> RGB.
    r, g, b = (int(v) for v in _pixels(cmyk)[cmyk.height // 5, cmyk.width // 4])
    assert r > 150 and g < 100 and b < 100


# --- limits ---------------------------------------------------------------------------------


def test_page_over_the_pixel_limit_fails_alone(tmp_path: Path) -> None:
    path = _write(tmp_path, "p.pdf", docs.make_pdf(2))
    tight = LimitSettings(max_pixels_per_page=100_000)
    with pytest.raises(PageError) as refused:
        render_page(path, "pdf", 1, COLQWEN2, tight)
    assert refused.value.error_type == "PageTooLarge"
    assert render_page(path, "pdf", 1, PlainTarget(max_pixels=90_000), tight).width > 0


def test_blob_and_page_count_limits(tmp_path: Path) -> None:
    path = _write(tmp_path, "p.pdf", docs.make_pdf(5))
    assert open_document(path, "pdf", LimitSettings(max_pages=5)).page_count == 5
    with pytest.raises(DocumentError) as too_many:
        open_document(path, "pdf", LimitSettings(max_pages=4))
    assert too_many.value.error_type == "TooManyPages"
    with pytest.raises(DocumentError) as too_big:
        open_document(path, "pdf", LimitSettings(max_blob_bytes=path.stat().st_size - 1))
    assert too_big.value.error_type == "BlobTooLarge"


def test_owner_locked_pdf_renders_its_text(tmp_path: Path) -> None:
    locked = render_page(_write(tmp_path, "o.pdf", docs.make_encrypted_pdf(1)), "pdf", 1, COLQWEN2, LIMITS)
    plain = render_page(_write(tmp_path, "p.pdf", docs.make_pdf(1, text_prefix="Secret")), "pdf", 1, COLQWEN2, LIMITS)
    # Same drawing, so decryption worked: a wrongly decrypted stream renders blank.
    dark_locked = int((_pixels(locked).mean(axis=2) < 128).sum())
    dark_plain = int((_pixels(plain).mean(axis=2) < 128).sum())
    assert dark_locked > 1000 and abs(dark_locked - dark_plain) < 0.05 * dark_plain


# --- worker processes -----------------------------------------------------------------------


@pytest.mark.slow  # starts a worker pool and renders 120 pages
def test_streaming_yields_in_order_with_bounded_outstanding_work(tmp_path: Path) -> None:
    path = _write(tmp_path, "long.pdf", docs.make_pdf(120))
    with StreamingRenderer(2, LIMITS, chunk_pages=4, max_outstanding_pages=16) as pool:
        seen = []
        for result in pool.render_document(path, "pdf", 120, COLQWEN2):
            assert isinstance(result, RenderedPage)
            seen.append(result.page_number)
            time.sleep(0.002)  # a consumer slower than the workers must not make them run ahead
        assert seen == list(range(1, 121))
        assert 8 <= pool.peak_outstanding_pages <= 16
        assert pool.workers_replaced == 0


@pytest.mark.slow
def test_abandoning_a_document_leaves_the_pool_usable(tmp_path: Path) -> None:
    path = _write(tmp_path, "long.pdf", docs.make_pdf(60))
    with StreamingRenderer(2, LIMITS, chunk_pages=4) as pool:
        stream = pool.render_document(path, "pdf", 60, COLQWEN2)
        assert [next(stream).page_number for _ in range(5)] == [1, 2, 3, 4, 5]
        stream.close()
        again = [r.page_number for r in pool.render_document(path, "pdf", 60, COLQWEN2)]
        assert again == list(range(1, 61))


@pytest.mark.slow
def test_a_page_past_the_time_limit_fails_alone_and_its_worker_is_replaced(tmp_path: Path) -> None:
    path = _write(tmp_path, "heavy.pdf", docs.make_heavy_pdf(6, heavy_page=3, depth=6))
    with StreamingRenderer(2, LimitSettings(render_timeout_s=1.0), chunk_pages=3) as pool:
        assert pool.inspect(path, "pdf").page_count == 6  # warm the pool first
        pids_before = set(pool.worker_pids())
        started = time.monotonic()
        results = list(pool.render_document(path, "pdf", 6, COLQWEN2))
        elapsed = time.monotonic() - started
        assert [r.page_number for r in results] == [1, 2, 3, 4, 5, 6]
        failed = {r.page_number: r.error_type for r in results if isinstance(r, PageFailure)}
        assert failed == {3: "RenderTimeout"}
        assert elapsed < 6  # the heavy page alone takes far longer when left to finish
        assert pool.workers_replaced == 1
        assert len(set(pool.worker_pids()) - pids_before) == 1


@pytest.mark.slow
def test_a_worker_crash_fails_only_the_page_in_flight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, "p.pdf", docs.make_pdf(8))
    faults.inject(monkeypatch, on_page=faults.segfault_on_page_3)
    with StreamingRenderer(2, LIMITS, chunk_pages=4) as pool:
        results = list(pool.render_document(path, "pdf", 8, COLQWEN2))
        assert [r.page_number for r in results] == list(range(1, 9))
        failed = [r for r in results if isinstance(r, PageFailure)]
        assert [(f.page_number, f.error_type) for f in failed] == [(3, "RendererCrashed")]
        assert "SIGSEGV" in failed[0].message
        # Pages 4.. of the crashed chunk were re-dispatched; the pool is whole again.
        assert len(pool.worker_pids()) == 2


@pytest.mark.slow
def test_a_document_that_always_kills_its_worker_is_given_up_quickly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(tmp_path, "p.pdf", docs.make_pdf(40))
    faults.inject(monkeypatch, on_page=faults.always_die)
    with StreamingRenderer(2, LIMITS, chunk_pages=4) as pool:
        results = list(pool.render_document(path, "pdf", 40, COLQWEN2))
        assert [r.page_number for r in results] == list(range(1, 41))
        assert all(isinstance(r, PageFailure) and r.error_type == "RendererCrashed" for r in results)
        assert pool.workers_replaced < 10


@pytest.mark.slow  # starts the module's worker pool
def test_inspect_reports_document_errors_from_the_worker(tmp_path: Path, renderer: StreamingRenderer) -> None:
    path = _write(tmp_path, "secret.pdf", docs.make_encrypted_pdf(1, user_password="pw"))
    with pytest.raises(DocumentError) as refused:
        renderer.inspect(path, "pdf")
    assert refused.value.error_type == "EncryptedDocument"


def test_extreme_strips_are_padded_to_an_aspect_ratio_vision_processors_accept() -> None:
    from PIL import Image

    from colstream.consumers.splitter.render import MAX_ASPECT_RATIO, pad_extreme_aspect

    for size in ((30000, 8), (8, 30000), (500, 5)):
        padded = pad_extreme_aspect(Image.new("RGB", size, (0, 0, 0)))
        w, h = padded.size
        assert max(w, h) <= MAX_ASPECT_RATIO * min(w, h)
        assert max(w, h) == max(size)  # content kept at full length, only the short side grows
    ordinary = Image.new("RGB", (600, 800))
    assert pad_extreme_aspect(ordinary) is ordinary
