"""``/admin/migration``: the ``colstream migrate`` commands, served by ``run all`` (admin scope).

The embedded store belongs to the process that runs the pipeline, so the migration
runs there and the CLI asks it over HTTP, as ``colstream documents`` does:

* ``POST /admin/migration`` ``{"family", "name_or_path", "revision", "tiny_model"}``: start;
* ``GET /admin/migration`` (``?document_id=`` adds that document's pages per index): status;
* ``POST /admin/migration/cutover`` (``?force=true`` before the backfill is complete);
* ``POST /admin/migration/finish`` and ``POST /admin/migration/abort``.

A command that cannot run now answers 404 (no migration), 409 (another one is
active, the backfill is not complete, the wrong phase) or 400, with the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from fastapi import APIRouter, Depends, HTTPException, Query
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from colstream.api.failures import public_reason
from colstream.api.models import ErrorResponse

log = logging.getLogger(__name__)


class MigrationsLike(Protocol):
    def start(
        self, family: str, name_or_path: str | None, revision: str | None, tiny_model: bool
    ) -> dict[str, Any]: ...

    def status(self, document_id: str | None = None) -> dict[str, Any]: ...

    def cutover(self, force: bool = False) -> dict[str, Any]: ...

    def finish(self) -> dict[str, Any]: ...

    def abort(self) -> dict[str, Any]: ...


class MigrationStart(BaseModel):
    family: str = Field(description="The new model's family, e.g. colpali or colqwen2.")
    name_or_path: str | None = Field(
        default=None, description="Checkpoint id or folder; the family's default when absent."
    )
    revision: str | None = None
    tiny_model: bool = Field(default=False, description="A locally built tiny checkpoint with RANDOM WEIGHTS.")


_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (400, 404, 409, 500)}


def build_migration_router(migrations: MigrationsLike, require: Callable[[str], Any]) -> APIRouter:
    from colstream.embedding.profile import ModelIdentityError
    from colstream.migration.core import MigrationError

    router = APIRouter(prefix="/admin/migration", tags=["migration"], responses=_ERRORS,
                       dependencies=[Depends(require("admin"))])

    async def call(method: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
        try:
            return await run_in_threadpool(method, *args)
        except MigrationError as exc:
            raise HTTPException(exc.status_code, exc.message) from exc
        except ValidationError as exc:
            reasons = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise HTTPException(400, reasons) from None
        except (ValueError, ModelIdentityError) as exc:  # e.g. a checkpoint without a projection layer
            raise HTTPException(400, public_reason(exc)) from exc
        except Exception as exc:
            log.exception("migration command failed")
            raise HTTPException(500, f"migration command failed: {public_reason(exc)}") from exc

    @router.post("")
    async def start(request: MigrationStart) -> dict[str, Any]:
        return await call(migrations.start, request.family, request.name_or_path, request.revision,
                          request.tiny_model)

    @router.get("")
    async def status(document_id: str | None = Query(None, description="Also count this document's pages.")
                     ) -> dict[str, Any]:
        return await call(migrations.status, document_id)

    @router.post("/cutover")
    async def cutover(force: bool = Query(False, description="Cut over before the backfill is complete.")
                      ) -> dict[str, Any]:
        return await call(migrations.cutover, force)

    @router.post("/finish")
    async def finish() -> dict[str, Any]:
        return await call(migrations.finish)

    @router.post("/abort")
    async def abort() -> dict[str, Any]:
        return await call(migrations.abort)

    return router
