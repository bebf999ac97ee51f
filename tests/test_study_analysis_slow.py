"""The default study's answer survives a second look: the same study with other seeds agrees."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch


def study_results():
    """docs/study_results.py, which also writes this comparison into docs/study.md."""
    path = Path(__file__).parents[1] / "docs" / "study_results.py"
    spec = importlib.util.spec_from_file_location("study_results", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_default_study_is_stable_under_reseeding(tmp_path):
    torch.set_num_threads(1)
    results = study_results()
    first, second = results.reseeded_studies(tmp_path / "s.db", ((0, 1, 2), (10, 11, 12)))
    for study in (first, second):
        assert study.recommendation.supported, study.recommendation.text
        assert study.fit.b_crit_lo <= study.fit.b_crit <= study.fit.b_crit_hi
    assert max(first.fit.b_crit_lo, second.fit.b_crit_lo) <= min(first.fit.b_crit_hi, second.fit.b_crit_hi)
    a, b = (s.plan.value_of(s.recommendation.batch_size) for s in (first, second))
    assert max(a, b) <= 2 * min(a, b)
    assert results.agree(first, second) == (True, True)
