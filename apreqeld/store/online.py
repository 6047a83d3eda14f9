"""The online section of a state dir: what the daemon learnt while serving, never part of a
manifest. Today the composed members (runtime.compose): their recipes, predicted figures and
what they measured once served; `apreqel planset run --measure-composed` reads them back to
score them offline as ordinary members."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from apreqeld.errors import InputError
from apreqeld.storage import atomic_path

KIND = "apreqeld.composed"


def composed_path(state_dir: Path, model_sha256: str, /) -> Path:
    return Path(state_dir) / "online" / f"composed-{model_sha256[:16]}.json"


def read_composed(state_dir: Path, model_sha256: str, /) -> dict:
    """The composed section for this model ({} when there is none or it is unreadable)."""
    try:
        data = json.loads(composed_path(state_dir, model_sha256).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and data.get("model") == model_sha256 else {}


def write_composed(state_dir: Path, model_sha256: str, /, *, kept: list[dict],
                   dropped: list[str], online: dict) -> None:
    """Replace the section (temp file, then rename); a read-only state dir is not an error."""
    data = {"kind": KIND, "model": model_sha256, "kept": kept, "dropped": dropped,
            "online": online}
    with contextlib.suppress(OSError), atomic_path(composed_path(state_dir, model_sha256)) as t:
        t.write_text(json.dumps(data, indent=1) + "\n")


def composed_recipes(state_dir: Path, model_sha256: str, /) -> list[tuple[str, dict, dict]]:
    """(label, recipe, predicted) of every composed member kept for this model; InputError
    naming the file when there is none."""
    kept = read_composed(state_dir, model_sha256).get("kept") or []
    found = [(f"{m['label']} (served online)", dict(m["recipe"]), dict(m.get("predicted") or {}))
             for m in kept if isinstance(m, dict) and m.get("recipe")]
    if not found:
        raise InputError(f"no composed members in {composed_path(state_dir, model_sha256)}: "
                         "apreqeld keeps them there once it has served one")
    return found
