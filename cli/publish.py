"""``colstream publish upload``: one file, a folder of files, or a blob URI."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from colstream.cli.common import connect, err_console, fail, progress_bar
from colstream.schemas.ids import InvalidDocumentId, check_document_id

_UNSAFE = re.compile(r"[^A-Za-z0-9._:@=+/-]")


def folder_document_id(root: Path, path: Path, prefix: str | None) -> str:
    """The id of ``path`` under ``root``: its relative path (``/``-separated, characters the id
    rule refuses turned into ``-``), below ``prefix`` when given."""
    relative = path.relative_to(root).as_posix()
    cleaned = "/".join(_UNSAFE.sub("-", part).lstrip(".") or "-" for part in relative.split("/"))
    if not cleaned[0].isalnum():
        cleaned = f"f{cleaned}"
    return f"{prefix.rstrip('/')}/{cleaned}" if prefix else cleaned


def folder_files(root: Path, glob: str) -> list[Path]:
    """Regular files under ``root`` matching ``glob`` at any depth, hidden ones left out."""
    return sorted(
        p for p in root.rglob(glob)
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def publish_upload(target: str, *, document_id: str | None, metadata: dict[str, Any] | None,
                   filename: str | None, content_type: str | None, glob: str = "*") -> int:
    from colstream.producers.publisher import UploadPublisher
    from colstream.schemas import UploadEvent

    path = Path(target)
    if "://" not in target and not path.exists():
        fail(f"{path} does not exist", code=2)
    if "://" not in target and path.is_dir():
        files = folder_files(path, glob)
        if not files:
            fail(f"no files matching {glob!r} under {path}", code=2)
        plan = [(p, folder_document_id(path, p, document_id)) for p in files]
    else:
        if not document_id:
            if "://" in target:
                fail("--document-id is required for a blob URI", code=2)
            document_id = path.stem
        plan = [(path, document_id)]
    for _, doc_id in plan:
        try:
            check_document_id(doc_id)
        except InvalidDocumentId as exc:
            fail(str(exc), code=2)

    publisher = UploadPublisher(connect())
    try:
        if "://" in target:
            event = UploadEvent(document_id=plan[0][1], blob_uri=target, filename=filename,
                                content_type=content_type, metadata=metadata)
            print(publisher.publish_upload(event).describe())
            return 0
        if len(plan) == 1 and path.is_file():
            print(publisher.publish_file(path, plan[0][1], metadata=metadata, content_type=content_type).describe())
            return 0
        with progress_bar(f"publishing {len(plan)} files", total=len(plan)) as progress:
            task = progress.task_ids[0]
            for file, doc_id in plan:
                published = publisher.publish_file(file, doc_id, metadata=metadata, content_type=content_type)
                print(f"{file} -> {published.key} (version {published.offset})")
                progress.advance(task)
        err_console.print(f"published {len(plan)} files from {path}")
        return 0
    finally:
        publisher.close()
