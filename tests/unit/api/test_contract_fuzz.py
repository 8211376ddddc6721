"""A bounded schemathesis run against ``/openapi.json`` with a valid API key, every check on.

The API runs on the fakes of ``test_app`` (a fake sink settles each upload and
delete at once, so waits end). No 5xx, and every response must match the
published schema: status codes, content types, headers and bodies. The schema
cannot say that a base64 string must decode to an image or an upload must be a
real PDF, so for well-formed requests the domain refusals (400, 413, 415, 422)
count as accepted; 2xx, 401, 403, 404 and 409 are schemathesis' own defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.config import SchemathesisConfig

from colstream.api.app import create_app
from colstream.infra.settings import ColstreamSettings
from tests.unit.api.test_app import FakeModel, FakePublisher, FakeStore, record

ADMIN_KEY = "fuzz-admin-key-0123456789"
EVENTGRID_SECRET = "fuzz-eventgrid-secret-0123456789"
# Per operation; the run stays within seconds on a small machine.
MAX_EXAMPLES = 25

CONFIG = SchemathesisConfig.from_str(
    """
[generation]
mode = "all"

[checks]
enabled = true

[checks.positive_data_acceptance]
expected-statuses = ["2xx", "400", "401", "403", "404", "409", "413", "415", "422"]
"""
)


def build_app(tmp_path: Path) -> Any:
    settings = ColstreamSettings(state_dir=tmp_path).updated(
        blob={"local_root": tmp_path / "blobs"},
        limits={"max_blob_bytes": 256 * 1024, "max_image_pixels": 500 * 500},
        api={"keys": [{"key": ADMIN_KEY, "scopes": ["admin"]}], "max_upload_bytes": 1024 * 1024},
        eventgrid={"shared_secret": EVENTGRID_SECRET},
    )
    store, publisher = FakeStore(), FakePublisher()
    publisher.on_upload = lambda event, offset: store.put(
        record(event.document_id, offset, "complete", total_pages=1, indexed_pages=[1], metadata=event.metadata)
    )
    publisher.on_delete = lambda document_id, offset: store.put(record(document_id, offset, "deleted", total_pages=0))
    store.put(record("doc-1", 1, "complete"))
    model = FakeModel()
    return create_app(settings, store=store, publisher=publisher, model_loader=lambda _: model,
                      poll_interval_s=0.01, gpu_probe=lambda: False)


@pytest.mark.slow  # a minute of generated requests: full suite only
def test_every_route_keeps_the_published_contract(tmp_path: Path) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", build_app(tmp_path), config=CONFIG)
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {operation.label for operation in operations}
    assert {"POST /search", "POST /ingest/pdf", "DELETE /document/{document_id}", "GET /health"} <= labels
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    failures: dict[str, str] = {}
    for operation in operations:
        # The console's event stream never ends by design, and the dead-letter routes read
        # a real topic; the console's own tests cover them against a broker.
        if operation.path.startswith(("/console", "/dead-letters")):
            continue

        @given(case=operation.as_strategy())
        @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case: Any) -> None:
            case.call_and_validate(headers=headers)

        try:
            check()
        except Exception as exc:  # every operation runs; all failures are reported together
            failures[operation.label] = str(exc)[:3000]
    assert not failures, "\n\n".join(f"== {label}\n{text}" for label, text in failures.items())
