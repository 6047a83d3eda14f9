"""Layer profiling: the residual stream captured inside llama.cpp, scored per sublayer."""

from __future__ import annotations

from pathlib import Path

import pytest

from apreqeld import workflow
from apreqeld.errors import InputError, ModelError
from apreqeld.evidence.profiling import profile_layers, read_calibration, stream_layout
from apreqeld.evidence.reference import Reference
from apreqeld.evidence.workspace import Workspace
from apreqeld.gguf.view import ModelView, read_model
from apreqeld.resources import calibration_text
from support import CALIBRATION_TOKENS, THREADS

# --------------------------------------------------------------------------- on the real model


@pytest.mark.integration
def test_layer_profile_covers_every_sublayer(layer_profile: dict,
                                             source_view: ModelView) -> None:
    subs = layer_profile["sublayers"]
    assert [s["name"] for s in subs] == [s.name for s in source_view.sublayers]
    assert len(subs) == 60
    assert sorted(s["rank"] for s in subs) == list(range(60))
    for s in subs:
        assert s["score"] == s["reward"] - s["penalty"]
        assert s["reward"] + s["penalty"] == CALIBRATION_TOKENS
        assert -1.0 <= s["mean_cosine"] <= 1.0
        assert (s["block"], s["kind"]) == (int(s["name"].split(".")[1]), s["name"].split(".")[2])
    # rank 0 is the highest score; equal scores rank the lower mean cosine first
    by_rank = sorted(subs, key=lambda s: s["rank"])
    keys = [(-s["score"], s["mean_cosine"]) for s in by_rank]
    assert keys == sorted(keys)


@pytest.mark.integration
def test_layer_profile_reports_its_evidence(layer_profile: dict, reference: Reference) -> None:
    assert layer_profile["text"] == "tinyshakespeare (shipped)"
    assert layer_profile["token_range"] == [0, CALIBRATION_TOKENS]
    assert layer_profile["tokens"] == CALIBRATION_TOKENS
    assert layer_profile["gamma"] == 0.9
    assert layer_profile["chunk"] == 512
    # llama.cpp names the block-0 input (the token embedding rows) "embd" in this build
    assert layer_profile["stream_names"] == {"input": "embd", "after_attention": "ffn_inp-N",
                                             "block_output": "l_out-N"}
    assert layer_profile["model_sha256"] == reference.source_sha256
    assert layer_profile["profiled_on"] == "F16 reference"


@pytest.mark.integration
def test_layer_scores_discriminate(layer_profile: dict) -> None:
    """Real activations: not every sublayer gets the same score."""
    scores = {s["score"] for s in layer_profile["sublayers"]}
    assert len(scores) > 5


@pytest.mark.integration
def test_profiling_twice_gives_identical_scores(layer_profile: dict,
                                                reference: Reference) -> None:
    again = profile_layers(read_model(reference.path), calibration_text(),
                           text_name="tinyshakespeare (shipped)", n_tokens=CALIBRATION_TOKENS,
                           threads=THREADS).to_dict()
    for first, second in zip(layer_profile["sublayers"], again["sublayers"], strict=True):
        assert first == second
    assert again["token_range"] == layer_profile["token_range"]


@pytest.mark.integration
def test_layer_profile_is_cached(layer_profile: dict, source_model: Path, workspace: Workspace,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = workflow.profile_layers

    def counting(*args: object, **kwargs: object):
        calls.append("profile")
        return real(*args, **kwargs)

    monkeypatch.setattr(workflow, "profile_layers", counting)
    again = workflow.layer_profile(source_model, workspace=workspace,
                                   n_tokens=CALIBRATION_TOKENS, threads=THREADS)
    assert calls == []
    assert again == layer_profile


@pytest.mark.integration
def test_bad_gamma_fails_before_any_llama_cpp_work(source_model: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def no_reference(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the F16 reference was prepared before gamma was checked")

    monkeypatch.setattr(workflow, "reference_file", no_reference)
    with pytest.raises(InputError, match=r"^gamma 1\.5 is outside \[-1, 1\]$"):
        workflow.layer_profile(source_model, workspace=Workspace(tmp_path), gamma=1.5,
                               n_tokens=CALIBRATION_TOKENS)


# --------------------------------------------------------------------------- bad calibration


@pytest.mark.parametrize("content", ["", "   \n\t\n"])
def test_empty_calibration_file_is_one_line(tmp_path: Path, tiny_model: Path,
                                            content: str) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text(content)
    with pytest.raises(InputError, match=r"^calibration file is empty: .*empty\.txt$") as info:
        workflow.layer_profile(tiny_model, workspace=Workspace(tmp_path / "home"),
                               calibration=str(empty))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "home" / "models").exists()


def test_missing_calibration_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"^calibration file not found: .*nope\.txt$"):
        read_calibration(tmp_path / "nope.txt")


def test_default_calibration_is_the_shipped_text() -> None:
    text, name = read_calibration(None)
    assert name == "tinyshakespeare (shipped)"
    assert text.startswith("First Citizen:")


def test_too_few_calibration_tokens(tmp_path: Path, tiny_model: Path) -> None:
    with pytest.raises(InputError, match="^calibration tokens must be at least 2, got 1$"):
        workflow.layer_profile(tiny_model, workspace=Workspace(tmp_path), n_tokens=1)


def test_blank_text_is_refused_before_loading(tiny_model: Path) -> None:
    with pytest.raises(InputError, match="^calibration text 'blank' is empty$"):
        profile_layers(read_model(tiny_model), " \n ", text_name="blank")


def test_stream_layout_names_what_is_missing() -> None:
    seen = {"inp_embd", "ffn_inp-0", "l_out-0", "ffn_inp-1"}
    layout = stream_layout({"inp_embd", "ffn_inp-0", "l_out-0"}, 1)
    assert layout == [("inp_embd", "ffn_inp-0", "l_out-0")]
    with pytest.raises(ModelError, match=r"residual stream of block 1 .*looked for l_out-1"):
        stream_layout(seen, 2)
    with pytest.raises(ModelError, match=r"^no embedding input in the graph"):
        stream_layout({"l_out-0", "ffn_inp-0"}, 1)


def test_stream_layout_chains_blocks() -> None:
    seen = {"inp_scaled", "attn_residual-0", "l_out-0", "sa_out-1", "l_out-1"}
    assert stream_layout(seen, 2) == [("inp_scaled", "attn_residual-0", "l_out-0"),
                                      ("l_out-0", "sa_out-1", "l_out-1")]

