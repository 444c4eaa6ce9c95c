"""The real-model corpus as a pytest parameter source.

A test that takes an argument named ``realmodel`` runs once per corpus model (``corpus.RealModel``:
id, path, kind, exporter, expected runnable or negative, reason). ``@pytest.mark.corpus(step=...,
expected=..., kind=..., ids=...)`` narrows the set and names the step whose ``corpus.KNOWN`` failures
are marked xfail(strict=True). The ``realmodel_path`` fixture returns the checked file: a missing file
fails under CI (CI=true) and skips elsewhere.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.realmodels import corpus


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "corpus(step, expected=None, kind=None, ids=None): parametrize `realmodel` over the corpus"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "realmodel" not in metafunc.fixturenames:
        return
    mark = metafunc.definition.get_closest_marker("corpus")
    kw = dict(mark.kwargs) if mark else {}
    models = corpus.corpus()
    if kw.get("expected"):
        models = [m for m in models if m.expected == kw["expected"]]
    if kw.get("kind"):
        models = [m for m in models if m.kind == kw["kind"]]
    if kw.get("ids"):
        models = [corpus.by_id(i) for i in kw["ids"]]
    metafunc.parametrize("realmodel", corpus.params(kw.get("step", ""), models))


@pytest.fixture
def realmodel_path(realmodel: corpus.RealModel) -> Path:
    return corpus.resolve(realmodel)
