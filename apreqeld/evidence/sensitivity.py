"""Measure each sublayer's sensitivity: the KL divergence it adds alone at an aggressive type.

One probe model per sublayer (every sublayer at `base`, that one at `probe`) is assembled from
the shard store (no quantization once the two types' shards are there) and scored on the
evaluation tokens; each score is cached, so a second run (or an interrupted one) assembles
nothing it already scored.
"""

from __future__ import annotations

from apreqeld.core.sensitivity import part_probe_recipe, parts, probe_recipe
from apreqeld.evidence.measurement import score_file
from apreqeld.evidence.protocol import Progress, Protocol, no_progress
from apreqeld.evidence.reference import Reference, assembled_model
from apreqeld.evidence.workspace import Workspace, cached_measurement, measurement_key
from apreqeld.gguf.view import ModelView


def measure_sensitivity(view: ModelView, reference: Reference, /, *, base: str, probe: str,
                        outside: str, protocol: Protocol, workspace: Workspace,
                        progress: Progress = no_progress) -> dict:
    """{"base", "probe", "base_kld", "sublayers": [names], "added_kld": [per sublayer],
    "part_added_kld": {part: every block's part at the probe}}."""
    def score(recipe: dict[str, str]) -> dict:
        def compute() -> dict:
            model = assembled_model(reference, recipe, outside, workspace=workspace,
                                    threads=protocol.threads)
            return score_file(model, protocol=protocol, reference=reference)

        key = measurement_key(recipe, reference, protocol) | {"apreqel_score": 1}
        return cached_measurement(workspace, key, compute)

    n = len(view.sublayers)
    base_recipe = probe_recipe(view, 0, base=base, probe=base, outside=outside)
    base_kld = score(base_recipe)["kld"]
    added = []
    for i, s in enumerate(view.sublayers):
        progress(f"sensitivity {s.name} at {probe}", i / n)
        added.append(score(probe_recipe(view, i, base=base, probe=probe, outside=outside))["kld"]
                     - base_kld)
    part_added = {}
    for p in parts(view):
        progress(f"sensitivity of every {p} at {probe}", 1.0)
        part_added[p] = score(part_probe_recipe(view, p, base=base, probe=probe,
                                                outside=outside))["kld"] - base_kld
    progress("sensitivity", 1.0)
    return {"base": base, "probe": probe, "outside": outside, "base_kld": base_kld,
            "sublayers": [s.name for s in view.sublayers], "added_kld": added,
            "part_added_kld": part_added}
