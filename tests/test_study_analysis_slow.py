"""The default study's answer survives a second look: the same study with other seeds agrees."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch


def docs_generator():
    """docs/generate.py, whose block `study_reseeding` also writes this comparison into docs/study.md."""
    path = Path(__file__).parents[1] / "docs" / "generate.py"
    spec = importlib.util.spec_from_file_location("docs_generate", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_default_study_is_stable_under_reseeding(tmp_path):
    torch.set_num_threads(1)
    generator = docs_generator()
    first, second = generator.reseeded_studies(tmp_path / "s.db", ((0, 1, 2), (10, 11, 12)))
    for study in (first, second):
        assert study.recommendation.supported, study.recommendation.text
        assert study.fit.b_crit_lo <= study.fit.b_crit <= study.fit.b_crit_hi
    assert max(first.fit.b_crit_lo, second.fit.b_crit_lo) <= min(first.fit.b_crit_hi, second.fit.b_crit_hi)
    a, b = (s.plan.value_of(s.recommendation.batch_size) for s in (first, second))
    assert max(a, b) <= 2 * min(a, b)
    assert generator.agree(first, second) == (True, True)
