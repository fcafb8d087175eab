"""The shared protocol's text and its split into calibration and evaluation windows."""

from __future__ import annotations

import pytest

from dynslice_modifier.evaluation import split_protocol, wikitext_path


def test_calibration_and_evaluation_come_from_the_two_halves():
    # Token ids that name their own position show which part of the text each window read.
    tokens = list(range(10_000))
    calib, evaluation = split_protocol(tokens, n_calib=4, calib_len=100, n_eval=2, eval_len=1000)
    assert calib.flatten().tolist() == list(range(400))
    assert evaluation.flatten().tolist() == list(range(5000, 7000))


def test_a_text_too_short_for_the_windows_names_the_half():
    with pytest.raises(ValueError, match=r"only 5 fit in the 5000 tokens of the text's second"):
        split_protocol(list(range(10_000)), n_calib=1, calib_len=10, n_eval=6, eval_len=1000)


def test_the_text_comes_from_the_argument_then_the_environment(tmp_path, monkeypatch):
    given, from_env = tmp_path / "given.raw", tmp_path / "env.raw"
    given.write_text("a")
    from_env.write_text("b")
    monkeypatch.setenv("DYNSLICE_WIKITEXT", str(from_env))
    assert wikitext_path() == from_env
    assert wikitext_path(given) == given
    monkeypatch.setenv("DYNSLICE_WIKITEXT", str(tmp_path / "missing.raw"))
    with pytest.raises(FileNotFoundError, match=r"missing\.raw.*DYNSLICE_WIKITEXT"):
        wikitext_path()
