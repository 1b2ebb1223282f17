"""Every recipe of the real-config corpus: merged equal to mergekit 0.1.5 (in distribution where masks are random)
or refused with a one-line error naming the field; and docs/recipe-corpus.md says so for each."""

from __future__ import annotations

import pytest
from recipe_corpus import REPORT, corpus_files, report_rows, run_case


@pytest.fixture(scope="module")
def corpus_workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("corpus")


def test_the_corpus_is_the_collected_one():
    files = corpus_files()
    assert len(files) >= 50
    assert set(report_rows(REPORT.read_text())) == {path.name for path in files}


@pytest.mark.parametrize("path", corpus_files(), ids=lambda path: path.stem[:40])
def test_recipe_merges_as_mergekit_or_is_refused_in_one_line(path, corpus_workdir):
    result = run_case(path, corpus_workdir)
    assert result.status in ("equal", "same distribution", "refused"), result
    if result.status == "refused":
        message = result.detail.split(" [mergekit:")[0]
        assert "\n" not in message and message.startswith("recipe") and len(message) < 400, message
    assert report_rows(REPORT.read_text())[path.name] == (result.method, result.status)
