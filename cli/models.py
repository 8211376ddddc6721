"""``colstream models list`` and ``colstream models build-tiny``.

``list`` prints every model family with its default checkpoint, the other checkpoints
known to load with it, its token cap and its dimension. The dimension is read from a
checkpoint on this machine (the configured path, the hub cache, or the family's tiny
checkpoint, built on demand with ``--tiny``) and says where it came from; without one
the published dimension is shown, marked as such.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from colstream.embedding.families import FAMILIES, FAMILY_NAMES, FamilySpec

models_app = typer.Typer(help="Model families and tiny offline checkpoints.", no_args_is_help=True)


def family_rows(tiny_cache: Path | None, build_tiny: bool = False) -> list[dict[str, Any]]:
    """One row per family: defaults, dimension and where the dimension was read."""
    from colstream.embedding.profile import ModelIdentityError, _cached_snapshot, index_model_for
    from colstream.embedding.tiny import ensure_tiny_checkpoint, is_random_weights_checkpoint, tiny_checkpoint_dir
    from colstream.infra.settings import ModelSettings

    rows = []
    for name, spec in FAMILIES.items():
        settings = ModelSettings(family=name)  # type: ignore[arg-type]
        dim: int | None = None
        source = "published"
        if _cached_snapshot(spec.default_model_id, None) is not None:
            with contextlib.suppress(ModelIdentityError):
                dim, source = index_model_for(settings).dim, "checkpoint"
        tiny_dim: int | None = None
        if tiny_cache is not None:
            folder = tiny_checkpoint_dir(name, tiny_cache)
            if build_tiny:
                folder = ensure_tiny_checkpoint(name, tiny_cache)
            if is_random_weights_checkpoint(folder):
                tiny = ModelSettings(family=name, name_or_path=str(folder))  # type: ignore[arg-type]
                tiny_dim = index_model_for(tiny).dim
        rows.append(
            {
                "family": name,
                "default": spec.default_model_id,
                "dim": dim if dim is not None else spec.published_dim,
                "dim_source": source,
                "tiny_dim": tiny_dim,
                "token_cap": spec.token_cap_note,
                "checkpoints": [model_id for model_id, _ in spec.checkpoints],
                "model_class": spec.model_class,
                "processor_class": spec.processor_class,
            }
        )
    return rows


@models_app.command("list")
def list_models(
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
    tiny: Annotated[
        bool, typer.Option("--tiny", help="build the tiny RANDOM WEIGHTS checkpoints and read their dims too")
    ] = False,
) -> None:
    """Every model family: its default checkpoint, other checkpoints, token cap and dimension."""
    from colstream.app import load_settings

    settings = load_settings()
    rows = family_rows(settings.state_dir / "models", build_tiny=tiny)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Model families (COLSTREAM_MODEL__FAMILY)")
    for column in ("family", "default checkpoint", "dim", "tiny dim", "token cap", "also loads"):
        table.add_column(column)
    for row in rows:
        marker = "" if row["dim_source"] == "checkpoint" else " (published)"
        table.add_row(
            row["family"] + (" *" if row["family"] == settings.model.family else ""),
            row["default"],
            f"{row['dim']}{marker}",
            "-" if row["tiny_dim"] is None else str(row["tiny_dim"]),
            row["token_cap"],
            ", ".join(row["checkpoints"]) or "-",
        )
    console = Console(width=200)
    console.print(table)
    console.print(
        "* configured. Dimensions marked (published) are the model card's: the index records the one read "
        "from the checkpoint. Tiny checkpoints have RANDOM WEIGHTS (`colstream models list --tiny` builds them)."
    )


@models_app.command("build-tiny")
def build_tiny(
    out: Annotated[Path, typer.Option("--out", help="folder to write the checkpoint to")],
    family: Annotated[str, typer.Option("--family", help=f"one of {', '.join(FAMILY_NAMES)}")] = "colqwen2",
) -> None:
    """Build a tiny checkpoint with RANDOM WEIGHTS for offline use."""
    from colstream.embedding.tiny import build_tiny_checkpoint

    if family not in FAMILIES:
        raise typer.BadParameter(f"unknown family {family!r}; expected one of {', '.join(FAMILY_NAMES)}")
    path = build_tiny_checkpoint(family, out)
    print(f"built a tiny {family} checkpoint with RANDOM WEIGHTS at {path}")


def describe(spec: FamilySpec) -> str:
    return f"{spec.name}: {spec.default_model_id} ({spec.model_class} / {spec.processor_class})"


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")
