"""Hypothesis settings of the property-based tests (tests/fuzz).

Profiles (pick one with pytest's `--hypothesis-profile NAME`; "dskc" is the default):
  dskc     a fixed seed (_fuzz.SEED): CI draws the same examples on every run;
  explore  a fresh random seed per run, for hunting new failures (`./dev test tests/fuzz -m slow
           --hypothesis-profile explore`).
Both replay, first, every failure stored in tests/fuzz/examples (committed): hypothesis saves each failing example
there, and this database never deletes one, so an example that failed once is replayed on every later run (as long
as its property's source, which keys its entries, is unchanged; each finding also gets a regression test).
"""
import collections
import pathlib

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.database import DirectoryBasedExampleDatabase

from _fuzz import Fuzz

EXAMPLES = pathlib.Path(__file__).parent / "examples"


class KeepFailures(DirectoryBasedExampleDatabase):
    """Hypothesis's directory database, minus deletion: a fixed failure stays and keeps being replayed (shrinking
    still moves the larger versions of a failure to the secondary corpus, so the primary holds the minimal one)."""

    def delete(self, key: bytes, value: bytes) -> None:
        pass


_COMMON = dict(database=KeepFailures(EXAMPLES), deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.large_base_example, HealthCheck.filter_too_much])
settings.register_profile("dskc", **_COMMON)
settings.register_profile("explore", **_COMMON)
settings.load_profile("dskc")


_COUNTS = pytest.StashKey[dict]()


@pytest.fixture
def fuzz(request, no_launch) -> Fuzz:
    """The first argument of every property: no-launch guard + this test's example counts."""
    counts = request.config.stash.setdefault(_COUNTS, {})
    return Fuzz(no_launch, counts.setdefault(request.node.nodeid, collections.Counter()))


def pytest_terminal_summary(terminalreporter, config):
    counts = config.stash.get(_COUNTS, {})
    if counts:
        terminalreporter.write_sep("-", "property-based examples per test (tests/fuzz)")
        for test, c in counts.items():
            terminalreporter.write_line(f"{test}: {sum(c.values())} examples: "
                                        + ", ".join(f"{n} {k}" for k, n in sorted(c.items())))
