"""Logs: JSON lines that parse, context on every line, and no secret in any line."""

from __future__ import annotations

import io
import json
import logging
import threading

from colstream.infra.logs import configure_logging, log_context, secret_values
from colstream.infra.settings import ColstreamSettings, LogSettings

SASL = "sasl-Secret-Pass\"word"
AZURE = "DefaultEndpointsProtocol=https;AccountName=a;AccountKey=c2VjcmV0LWtleQ==;"


def secret_settings() -> ColstreamSettings:
    return ColstreamSettings().updated(
        kafka={"sasl_password": SASL}, qdrant={"api_key": "qdrant-key-123456"},
        blob={"azure_connection_string": AZURE},
    )


def test_json_lines_parse_and_carry_stage_and_document_context() -> None:
    stream = io.StringIO()
    configure_logging(LogSettings(format="json"), stage="splitter", stream=stream)
    log = logging.getLogger("colstream.test")
    log.info("plain")
    with log_context(document_id="doc-1", version=4, page=2):
        log.warning("rendered %s", "page")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines[0]["stage"] == "splitter" and lines[0]["message"] == "plain" and lines[0]["level"] == "INFO"
    assert lines[1] | {"document_id": "doc-1", "version": 4, "page": 2} == lines[1]
    assert lines[0]["document_id"] is None


def test_stage_threads_name_their_stage() -> None:
    stream = io.StringIO()
    configure_logging(LogSettings(format="json"), stage="all", stream=stream)
    thread = threading.Thread(target=lambda: logging.getLogger("colstream.x").info("in sink"), name="stage-sink")
    thread.start()
    thread.join()
    assert json.loads(stream.getvalue().splitlines()[-1])["stage"] == "sink"


def test_secrets_never_appear_in_text_or_json() -> None:
    settings = secret_settings()
    assert {SASL, AZURE, "qdrant-key-123456"} <= secret_values(settings)
    for fmt in ("json", "text"):
        stream = io.StringIO()
        configure_logging(LogSettings(format=fmt), stage="sink", settings=settings, stream=stream)
        log = logging.getLogger("colstream.test")
        log.error("connecting with %s and %s", SASL, {"conn": AZURE})
        try:
            raise ValueError("bad key qdrant-key-123456")
        except ValueError:
            log.exception("failed")
        out = stream.getvalue()
        assert "Secret-Pass" not in out and "AccountKey=c2Vj" not in out and "qdrant-key-123456" not in out
        assert "***" in out


def test_library_chatter_is_quiet_unless_verbose() -> None:
    stream = io.StringIO()
    configure_logging(LogSettings(format="text"), stream=stream)
    logging.getLogger("httpx").info("HTTP Request: GET http://x 200 OK")
    assert "HTTP Request" not in stream.getvalue()
    configure_logging(LogSettings(format="text"), verbosity=1, stream=stream)
    logging.getLogger("httpx").info("HTTP Request: GET http://x 200 OK")
    assert "HTTP Request" in stream.getvalue()
