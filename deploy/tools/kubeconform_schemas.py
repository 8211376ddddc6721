"""Lay out the Kubernetes JSON Schemas that the PyPI package kubernetes-validate ships
in the form kubeconform reads: one self-contained file per kind and version.

kubernetes-validate's schemas refer to ``/api/_definitions.json``, a path only its own
resolver maps. Each top-level schema is rewritten here with the definitions it reaches
inlined under ``$defs``, so kubeconform needs nothing but the file.

    python deploy/tools/kubeconform_schemas.py TARGET 1.31.0 1.32.0 ...
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate

REF = re.compile(r'"\$ref": ?"(?:(?:/api/)?_definitions\.json)?#/\$defs/([^"]+)"')


def standalone(text: str, definitions: dict[str, Any], encoded: dict[str, str]) -> str:
    needed: set[str] = set()
    pending = REF.findall(text)
    while pending:
        name = pending.pop()
        if name not in needed:
            needed.add(name)
            pending.extend(REF.findall(encoded[name]))
    schema = json.loads(REF.sub(r'"$ref": "#/$defs/\1"', text))
    schema["$defs"] = {name: json.loads(REF.sub(r'"$ref": "#/$defs/\1"', encoded[name])) for name in sorted(needed)}
    return json.dumps(schema)


def main(target: Path, versions: list[str]) -> int:
    source = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    for version in versions:
        folder = f"v{version}-local-strict"
        out = target / folder
        stamp = out / ".complete"
        if stamp.exists():
            continue
        out.mkdir(parents=True, exist_ok=True)
        definitions = json.loads((source / folder / "_definitions.json").read_text())["$defs"]
        encoded = {name: json.dumps(value) for name, value in definitions.items()}
        for schema in (source / folder).glob("*.json"):
            if schema.name.startswith("_") or schema.name == "all.json":
                continue
            text = json.dumps(json.loads(schema.read_text()))
            (out / schema.name).write_text(standalone(text, definitions, encoded))
        stamp.touch()
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2:]))
