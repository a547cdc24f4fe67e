"""The catalogue of bad inputs (``tests/catalogue.py``): every case must end in one clear error of
the right kind (a damaged cache: a clean regeneration), with nothing modified, within 10 s."""

from __future__ import annotations

import pytest

from .catalogue import Ctx, cases

CASES = cases()
SECONDS = 10.0


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    return Ctx(tmp_path_factory.mktemp("catalogue"))


def test_the_catalogue_is_large_and_covers_every_kind():
    kinds = {c.kind for c in CASES}
    assert len(CASES) >= 160 and kinds == {"recipe", "space", "argument", "saved", "cache",
                                           "study", "api", "machine", "export"}
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input(case, ctx):
    outcome = case.run(ctx)
    assert outcome.clear, outcome.message
    assert outcome.untouched, f"modified by a failed call: {outcome.message}"
    assert outcome.seconds < SECONDS, f"{outcome.seconds:.1f} s to the error"
