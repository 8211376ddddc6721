"""JSON Schema files for every contract, generated from the pydantic models.

The committed files under ``schemas/json/`` are what non-Python producers
validate against; ``python -m colstream.schemas.jsonschema`` regenerates them
and a unit test fails when they drift from the models.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from colstream.schemas.events import (
    PAGE_MESSAGE_SCHEMA,
    VECTORS_MESSAGE_SCHEMA,
    DeadLetter,
    DocumentIndexed,
    UploadEvent,
)

SCHEMA_DIR = Path(__file__).resolve().parent / "json"

CONTRACTS: dict[str, Any] = {
    "upload-event": UploadEvent,
    "pages-message": PAGE_MESSAGE_SCHEMA,
    "vectors-message": VECTORS_MESSAGE_SCHEMA,
    "document-indexed": DocumentIndexed,
    "dead-letter": DeadLetter,
}


def render_schemas() -> dict[str, str]:
    out = {}
    for name, model in CONTRACTS.items():
        schema = TypeAdapter(model).json_schema()
        schema["$id"] = f"https://colstream.dev/schemas/{name}.json"
        schema.setdefault("title", name)
        out[f"{name}.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return out


def write_schemas(directory: Path = SCHEMA_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, text in render_schemas().items():
        path = directory / filename
        path.write_text(text)
        written.append(path)
    return written


if __name__ == "__main__":
    for path in write_schemas(Path(sys.argv[1]) if len(sys.argv) > 1 else SCHEMA_DIR):
        print(path)
