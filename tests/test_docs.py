"""The README stays true: its generated spec reference matches the code."""

from __future__ import annotations

from kubetune.trainer.api.specdoc import BEGIN, END, render

from .conftest import REPO


def test_readme_spec_reference_is_current():
    text = (REPO / "README.md").read_text()
    generated = text[text.index(BEGIN) + len(BEGIN): text.index(END)].strip()
    assert generated == render().strip(), "README spec reference is stale: run `python -m kubetune.trainer.api.specdoc README.md`"
