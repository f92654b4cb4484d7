"""Input bounds (DESIGN §8, `app.limits`) and the opaque cursors of connections
(`app.pagination`) and subscriptions (`app.events.outbox`)."""

from __future__ import annotations

import base64
import math

import pytest

from app import limits
from app.errors import BadUserInputError
from app.events.outbox import decode_event_cursor, encode_event_cursor
from app.pagination import decode_cursor, encode_cursor, make_page


def b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode()


def refused(call: object, *args: object, **kwargs: object) -> BadUserInputError:
    assert callable(call)
    with pytest.raises(BadUserInputError) as caught:
        call(*args, **kwargs)
    return caught.value


# -- text ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "max_len", "required"),
    [("", 10, False), ("a" * 10, 10, False), ("x", 1, True), ("  padded  ", 10, True),
     ("émoji 🚀", 7, True), ("line\nbreak\ttab", 20, True)],
)
def test_text_accepts_values_within_bounds_unchanged(
    value: str, max_len: int, required: bool
) -> None:
    assert limits.text("input.title", value, max_len=max_len, required=required) == value


@pytest.mark.parametrize(
    ("value", "max_len", "required", "message"),
    [
        ("a" * 11, 10, False, "at most 10 characters"),
        ("", 10, True, "must not be empty"),
        ("   \n\t", 10, True, "must not be empty"),
        ("nul\x00byte", 20, False, "NUL"),
    ],
)
def test_text_refusals_name_the_field(
    value: str, max_len: int, required: bool, message: str
) -> None:
    error = refused(limits.text, "input.title", value, max_len=max_len, required=required)
    assert error.field == "input.title"
    assert error.extensions == {"code": "BAD_USER_INPUT", "field": "input.title"}
    assert message in error.message


def test_optional_text() -> None:
    assert limits.optional_text("reason", None, max_len=5) is None
    assert limits.optional_text("reason", "ok", max_len=5) == "ok"
    assert refused(limits.optional_text, "reason", "", max_len=5).field == "reason"
    assert refused(limits.optional_text, "reason", "toolong", max_len=5).field == "reason"


# -- names -----------------------------------------------------------------------


def test_names_deduplicates_strips_and_keeps_order() -> None:
    assert limits.names("worker.capabilities", ["gpu", " os:mac", "gpu", "os:mac ", "a"]) == (
        "gpu", "os:mac", "a",
    )
    assert limits.names("worker.capabilities", None) == ()
    assert limits.names("worker.capabilities", []) == ()


@pytest.mark.parametrize(
    "values",
    [
        ["ok", ""],
        ["ok", "   "],
        ["x" * (limits.NAME_MAX + 1)],
        [f"n{i}" for i in range(limits.NAMES_MAX + 1)],
    ],
)
def test_names_refusals_name_the_field(values: list[str]) -> None:
    assert refused(limits.names, "input.capabilities", values).field == "input.capabilities"


def test_names_bounds_are_inclusive() -> None:
    at_max = [f"n{i}" for i in range(limits.NAMES_MAX)]
    assert limits.names("f", at_max) == tuple(at_max)
    assert limits.names("f", ["x" * limits.NAME_MAX]) == ("x" * limits.NAME_MAX,)
    assert limits.names("f", ["a", "b", "c"], max_items=3, max_len=1) == ("a", "b", "c")
    assert refused(limits.names, "f", ["a", "b", "c", "d"], max_items=3).field == "f"


# -- numbers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "ok"), [(4, False), (5, True), (300, True), (21_600, True), (21_601, False)]
)
def test_integer_bounds_are_inclusive(value: int, ok: bool) -> None:
    lo, hi = limits.LEASE_SECONDS_MIN, limits.LEASE_SECONDS_MAX
    if ok:
        assert limits.integer("leaseSeconds", value, lo=lo, hi=hi) == value
    else:
        error = refused(limits.integer, "leaseSeconds", value, lo=lo, hi=hi)
        assert error.field == "leaseSeconds"
        assert "between 5 and 21600" in error.message


@pytest.mark.parametrize(
    ("value", "ok"),
    [(0.0, True), (1e6, True), (12.5, True), (-0.01, False), (1e6 + 1, False),
     (math.nan, False), (math.inf, False), (-math.inf, False)],
)
def test_number_bounds_refuse_nan_and_infinity(value: float, ok: bool) -> None:
    if ok:
        assert limits.number("metrics.costUsd", value, lo=0.0, hi=limits.COST_MAX) == value
    else:
        error = refused(limits.number, "metrics.costUsd", value, lo=0.0, hi=limits.COST_MAX)
        assert error.field == "metrics.costUsd"


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, limits.PAGE_SIZE_DEFAULT), (1, 1), (50, 50), (limits.PAGE_SIZE_MAX, 200)],
)
def test_page_size(value: int | None, expected: int) -> None:
    assert limits.page_size(value) == expected


@pytest.mark.parametrize("value", [0, -1, limits.PAGE_SIZE_MAX + 1, 10**9])
def test_page_size_out_of_bounds(value: int) -> None:
    assert refused(limits.page_size, value).field == "first"
    assert refused(limits.page_size, value, "comments.first").field == "comments.first"


# -- connection cursors ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["job", "item", "comment"])
@pytest.mark.parametrize("ident", [0, 1, 42, 2**31 - 1])
def test_cursor_round_trip(kind: str, ident: int) -> None:
    cursor = encode_cursor(kind, ident)
    assert kind not in cursor  # opaque
    assert decode_cursor(kind, cursor) == ident


def test_no_cursor_means_from_the_start() -> None:
    assert decode_cursor("job", None) is None


@pytest.mark.parametrize(
    ("kind", "cursor"),
    [
        ("job", encode_cursor("item", 5)),
        ("item", encode_cursor("job", 5)),
        ("comment", encode_cursor("item", 5)),
        ("job", encode_event_cursor(5)),
        ("job", "garbage"),
        ("job", "!!!!"),
        ("job", ""),
        ("job", "a"),  # bad base64 padding
        ("job", base64.urlsafe_b64encode(b"\xff\xfe:1").decode()),  # not UTF-8
        ("job", b64("job:")),
        ("job", b64("job:-1")),
        ("job", b64("job:1.5")),
        ("job", b64("job: 1")),
        ("job", b64("job:0x10")),
        ("job", b64("job:²")),  # str.isdigit() is true, int() refuses it
        ("job", b64("job:١٢")),  # non-ASCII digits
        ("job", b64("job:" + "9" * 5000)),  # beyond int()'s digit limit
        ("job", b64(f"job:{2**31}")),  # beyond the INTEGER id columns
        ("job", b64("job:99999999999999999999")),
        ("job", b64("JOB:1")),
        ("job", "😀"),
    ],
)
def test_foreign_and_garbage_cursors_are_bad_input_on_after(kind: str, cursor: str) -> None:
    error = refused(decode_cursor, kind, cursor)
    assert error.field == "after"
    assert error.extensions == {"code": "BAD_USER_INPUT", "field": "after"}


def test_cursor_field_name_can_be_chosen() -> None:
    assert refused(decode_cursor, "comment", "nope", "comments.after").field == "comments.after"


def test_make_page_uses_the_extra_row_only_to_say_there_is_more() -> None:
    rows = [10, 20, 30]
    page = make_page("job", rows, 2, lambda row: row)
    assert list(page.nodes) == [10, 20]
    assert page.has_next_page is True
    assert decode_cursor("job", page.end_cursor) == 20

    last = make_page("job", rows, 3, lambda row: row)
    assert list(last.nodes) == rows
    assert last.has_next_page is False
    assert decode_cursor("job", last.end_cursor) == 30

    no_rows: list[int] = []
    empty = make_page("job", no_rows, 5, lambda row: row)
    assert list(empty.nodes) == []
    assert empty.end_cursor is None
    assert empty.has_next_page is False


def test_make_page_gives_every_node_its_cursor_and_says_when_a_page_came_after_one() -> None:
    first = make_page("job", [10, 20, 30], 2, lambda row: row)
    assert [decode_cursor("job", cursor) for cursor in first.cursors] == [10, 20]
    assert (first.start_cursor, first.end_cursor) == (first.cursors[0], first.cursors[1])
    assert first.has_previous_page is False

    second = make_page("job", [30], 2, lambda row: row, after=first.end_cursor)
    assert second.has_previous_page is True
    assert second.start_cursor == second.end_cursor == second.cursors[0]

    empty = make_page("job", [], 2, lambda row: row, after=second.end_cursor)
    assert (empty.start_cursor, empty.end_cursor, empty.has_previous_page) == (None, None, True)


# -- event cursors ---------------------------------------------------------------


@pytest.mark.parametrize("seq", [0, 1, 7, 123_456_789, 2**63 - 1])
def test_event_cursor_round_trip(seq: int) -> None:
    cursor = encode_event_cursor(seq)
    assert not cursor.isdigit()  # opaque, not the bare number
    assert decode_event_cursor(cursor) == seq


def test_event_cursors_order_by_sequence_after_decoding() -> None:
    cursors = [encode_event_cursor(seq) for seq in (3, 10, 2)]
    assert sorted(decode_event_cursor(cursor) for cursor in cursors) == [2, 3, 10]


@pytest.mark.parametrize(
    "cursor",
    [
        encode_cursor("job", 5),
        encode_cursor("item", 5),
        "garbage",
        "a",
        "",
        base64.urlsafe_b64encode(b"\xff\xfe").decode(),
        b64("event:"),
        b64("event:-3"),
        b64("event:3 "),
        b64("event:²"),
        b64("event:٣"),
        b64("event:" + "9" * 5000),
        b64(f"event:{2**63}"),
        b64("events:3"),
        b64("3"),
    ],
)
def test_foreign_and_garbage_event_cursors_are_bad_input(cursor: str) -> None:
    error = refused(decode_event_cursor, cursor)
    assert error.field == "after"
    assert error.extensions["code"] == "BAD_USER_INPUT"


def test_event_cursor_field_name_can_be_chosen() -> None:
    assert refused(decode_event_cursor, "nope", field_name="input.after").field == "input.after"
