"""The work directory ($APREQEL_HOME): models, references and the measurement cache, keyed by
what determines each measurement."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from apreqeld import engine
from apreqeld.gguf.view import file_sha256
from apreqeld.storage import default_workdir, write_json_atomic

if TYPE_CHECKING:
    from apreqeld.evidence.protocol import Protocol
    from apreqeld.evidence.reference import Reference


class Workspace:
    """The work directory: reference model, tokens, reference log-probs, measurement cache."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root else default_workdir()
        self.root.mkdir(parents=True, exist_ok=True)

    def model_dir(self, sha: str) -> Path:
        d = self.root / "models" / sha[:16]
        d.mkdir(parents=True, exist_ok=True)
        return d

    def measurement_path(self, key: str) -> Path:
        return self.root / "measurements" / f"{key}.json"

    def sha256(self, path: Path) -> str:
        return file_sha256(path, cache_dir=self.root)


def cached_measurement(workspace: Workspace, key_parts: dict, compute: Callable[[], dict]) -> dict:
    """Return the stored measurement for `key_parts`, or compute, store and return it."""
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:24]
    path = workspace.measurement_path(key)
    if path.exists():
        try:
            return json.loads(path.read_text())["result"]
        except (ValueError, KeyError):
            path.unlink()
    result = compute()
    write_json_atomic(path, {"key": key_parts, "result": result,
                             "measured": datetime.now(UTC).isoformat(timespec="seconds")})
    return result


def measurement_key(tensor_types: dict[str, str], reference: Reference, protocol: Protocol) -> dict:
    """What a measurement of a model built from `reference` with `tensor_types` depends on."""
    recipe = hashlib.sha256(json.dumps(tensor_types, sort_keys=True).encode()).hexdigest()
    return {"model": reference.source_sha256, "recipe": recipe, "engine": engine.engine_version(),
            "protocol": asdict(protocol), "apreqel_measure": 1}


