"""The stages' unit bookkeeping (distsim.pipeline.units.Units), without Ray: the queue, one line
per failed attempt, retries up to max_failures, give-up by group, progress and outcome counts."""

from __future__ import annotations

import io

from distsim.pipeline.units import Units, error_text


def _units(names: list[str], **kwargs) -> tuple[Units[str], io.StringIO]:
    out = io.StringIO()
    return Units("pairs", names, label=lambda u: f"tile {u}", max_failures=1, stream=out,
                 noun="tile", **kwargs), out


def test_a_failed_unit_goes_to_the_back_until_its_retries_are_spent() -> None:
    units, out = _units(["a", "b", "c"])
    with units:
        assert units.take(2) == ["a", "b"]
        assert units.failed("a", "E: boom") is True
        units.done("b")
        assert list(units.pending) == ["c", "a"]
        assert units.take() == ["c", "a"]
        units.done("c")
        assert units.failed("a", "E: again") is False
        assert not units.pending and units.progress.done == 3 and units.succeeded == 2
    lines = [x for x in out.getvalue().splitlines() if "failed" in x]
    assert lines == ["pairs     tile a failed (retrying): E: boom",
                     "pairs     tile a failed (giving up): E: again"]
    assert units.outcome() == {"failed": 1, "error": "E: again"}


def test_giving_up_a_unit_gives_up_its_group_and_drops_its_later_results() -> None:
    units, out = _units(["t1-0", "t1-1", "t1-2", "t2-0"], group=lambda u: u[:2])
    units.done("t1-0")
    units.failed("t1-1", "E: 1")
    assert units.failed("t1-1", "E: 2") is False  # gives up t1: t1-2 counts now
    assert units.progress.done == 3 and units.dropped("t1-2") and not units.dropped("t2-0")
    assert units.failed("t1-2", "E: 3") is False  # dropped: no line, not queued, not counted
    units.done("t1-2", "t2-0")
    assert units.progress.done == 4 and units.succeeded == 2
    assert out.getvalue().count(" failed (") == 2 and "t1-2" not in out.getvalue()
    assert units.outcome() == {"failed": 1, "error": "E: 2"}


def test_a_mechanism_that_retries_by_itself_only_reports() -> None:
    units, out = _units(["a"])
    assert units.take() == ["a"]  # handed to the mechanism (Tune)
    assert units.failed("a", "E", again=True) is True and not units.pending
    assert units.failed("a", "E", again=False) is False
    assert "(retrying)" in out.getvalue() and units.progress.done == 1


def test_error_text_is_the_cause_on_one_line() -> None:
    class Wrapped(Exception):
        cause = ValueError("bad\n  value \x1b[31mred\x1b[0m")

    assert error_text(Wrapped()) == "ValueError: bad value red"


def test_progress_counts_each_unit_by_its_size_given_up_ones_included() -> None:
    units, out = _units(["ab", "cde", "f"], size=len, group=lambda u: u in ("ab", "f"))
    with units:
        assert units.progress.total == 6
        units.done("cde")
        assert (units.progress.done, units.succeeded) == (3, 1)
        units.failed("ab", "E: boom")
        assert units.failed("ab", "E: again") is False  # gives up "ab" and "f", one group
        assert (units.progress.done, units.succeeded) == (6, 1)
    assert "6/6 tile" in out.getvalue()
