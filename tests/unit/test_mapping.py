"""The bridge's pure rules (DESIGN §4): label hints, stage → item status, the
metrics-only echo comment, and the item → job spec mapping."""

from __future__ import annotations

import dataclasses
import inspect
from datetime import UTC, datetime, timedelta

import pytest

from app.bridge.mapping import (
    EchoPlan,
    JobFigures,
    LabelHints,
    decide_echo,
    echo_comment,
    echo_covered,
    hints_from_labels,
    item_status_for_stage,
    plan_echo,
    same_status_move,
    same_status_stages,
)
from app.bridge.service import IngestOptions, job_spec_for_item
from app.errors import BadUserInputError
from app.fleet.models import JobStage, Priority
from app.tracker.models import Item, ItemStatus

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)

# -- label hints -----------------------------------------------------------------


def test_hints_from_the_design_example() -> None:
    hints = hints_from_labels(["engine-class:agentic-coder", "priority:high", "cap:os:mac"])
    assert hints == LabelHints(
        engine_class="agentic-coder", profile=None, priority=Priority.HIGH,
        capabilities=("os:mac",),
    )


def test_every_hint_kind_and_other_labels_ignored() -> None:
    hints = hints_from_labels([
        "bug", "cap:gpu", "profile:fast", "area:engine-class", "needs-triage",
        "engine-class:reviewer", "cap:os:linux", "priority:urgent", "Priority:low", "capx",
    ])
    assert hints.engine_class == "reviewer"
    assert hints.profile == "fast"
    assert hints.priority == Priority.URGENT
    assert hints.capabilities == ("gpu", "os:linux")


@pytest.mark.parametrize("labels", [[], ["bug"], ["p1", "help wanted", "caps:gpu", "cap"]])
def test_no_hint_labels_give_empty_hints(labels: list[str]) -> None:
    assert hints_from_labels(labels) == LabelHints()


@pytest.mark.parametrize(
    ("label", "priority"),
    [
        ("priority:low", Priority.LOW),
        ("priority:normal", Priority.NORMAL),
        ("priority:high", Priority.HIGH),
        ("priority:urgent", Priority.URGENT),
        ("priority:HIGH", Priority.HIGH),
        ("priority:Urgent", Priority.URGENT),
        ("priority:  low ", Priority.LOW),
    ],
)
def test_priority_is_case_insensitive(label: str, priority: Priority) -> None:
    assert hints_from_labels([label]).priority == priority


@pytest.mark.parametrize("value", ["critical", "p1", "highest", "3", "hi gh"])
def test_unknown_priority_is_bad_input_naming_the_label(value: str) -> None:
    label = f"priority:{value}"
    with pytest.raises(BadUserInputError) as caught:
        hints_from_labels(["bug", label])
    assert caught.value.field == "labels"
    assert caught.value.extensions == {"code": "BAD_USER_INPUT", "field": "labels"}
    assert label in caught.value.message


def test_the_field_name_can_be_chosen_by_the_caller() -> None:
    with pytest.raises(BadUserInputError) as caught:
        hints_from_labels(["priority:nope"], field="input.labels")
    assert caught.value.field == "input.labels"


@pytest.mark.parametrize("label", ["cap:", "priority:", "engine-class:", "profile:", "cap:  "])
def test_a_hint_label_without_a_value_is_refused(label: str) -> None:
    with pytest.raises(BadUserInputError) as caught:
        hints_from_labels([label])
    assert caught.value.field == "labels"
    assert f"'{label}'" in caught.value.message


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("priority:high", "priority:low"),
        ("engine-class:coder", "engine-class:reviewer"),
        ("profile:fast", "profile:cheap"),
        ("priority:high", "priority:bogus"),
    ],
)
def test_contradicting_single_valued_hints_are_refused(first: str, second: str) -> None:
    with pytest.raises(BadUserInputError) as caught:
        hints_from_labels([first, "bug", second])
    assert caught.value.field == "labels"
    assert first in caught.value.message
    assert second in caught.value.message


@pytest.mark.parametrize(
    "labels",
    [
        ["priority:high", "priority:high"],
        ["priority:high", "priority:HIGH"],
        ["engine-class:coder", "engine-class:coder"],
        ["profile:fast", "profile: fast"],
    ],
)
def test_repeating_the_same_hint_is_not_a_contradiction(labels: list[str]) -> None:
    hints = hints_from_labels(labels)
    assert hints != LabelHints()


def test_duplicate_capabilities_are_deduplicated_in_first_seen_order() -> None:
    hints = hints_from_labels(["cap:gpu", "cap:os:mac", "cap:gpu", "cap: os:mac", "cap:ram"])
    assert hints.capabilities == ("gpu", "os:mac", "ram")


# -- stage → item status ---------------------------------------------------------


@pytest.mark.parametrize(
    ("stage", "status"),
    [
        (JobStage.QUEUED, ItemStatus.IN_PROGRESS),
        (JobStage.ASSIGNED, ItemStatus.IN_PROGRESS),
        (JobStage.BUILDING, ItemStatus.IN_PROGRESS),
        (JobStage.REVIEW, ItemStatus.IN_PROGRESS),
        (JobStage.TESTING, ItemStatus.IN_PROGRESS),
        (JobStage.SHIPPED, ItemStatus.DONE),
        (JobStage.FAILED, ItemStatus.BLOCKED),
        (JobStage.CANCELLED, None),
    ],
)
def test_item_status_for_every_stage(stage: JobStage, status: ItemStatus | None) -> None:
    assert item_status_for_stage(stage) == status


def test_the_status_table_covers_all_eight_stages() -> None:
    assert len(JobStage) == 8
    for stage in JobStage:
        item_status_for_stage(stage)  # raises KeyError for a stage left out


# -- the echo comment ------------------------------------------------------------


def figures(**overrides: object) -> JobFigures:
    values: dict[str, object] = {
        "job_id": 42, "stage": JobStage.SHIPPED, "attempts": 2, "max_attempts": 3,
        "started_at": NOW - timedelta(seconds=95, milliseconds=250), "finished_at": NOW,
        "cost_usd": 1.23456, "tokens_in": 1200, "tokens_out": 345,
    }
    values.update(overrides)
    return JobFigures(**values)  # type: ignore[arg-type]


def test_job_figures_hold_metrics_only() -> None:
    names = {field.name for field in dataclasses.fields(JobFigures)}
    assert names == {
        "job_id", "stage", "attempts", "max_attempts", "started_at", "finished_at",
        "cost_usd", "tokens_in", "tokens_out",
    }
    # Nothing but the figures, the status and the clock reaches the comment.
    assert list(inspect.signature(echo_comment).parameters) == ["figures", "status", "now"]


def test_echo_comment_with_every_metric() -> None:
    text = echo_comment(figures(), ItemStatus.DONE, NOW + timedelta(hours=1))
    assert text.splitlines() == [
        "fleetbridge: job 42 is SHIPPED; item set to DONE.",
        "- stage: SHIPPED",
        "- attempts: 2/3",
        "- duration: 95.2s",
        "- cost: $1.2346",
        "- tokens: 1200 in / 345 out",
    ]


def test_echo_comment_of_a_running_job_measures_duration_until_now() -> None:
    running = figures(
        stage=JobStage.BUILDING, started_at=NOW - timedelta(seconds=12), finished_at=None,
        cost_usd=0.0, tokens_in=0, tokens_out=0,
    )
    text = echo_comment(running, ItemStatus.IN_PROGRESS, NOW)
    assert text.splitlines() == [
        "fleetbridge: job 42 is BUILDING; item set to IN_PROGRESS.",
        "- stage: BUILDING",
        "- attempts: 2/3",
        "- duration: 12.0s",
    ]


def test_echo_comment_leaves_out_unknown_metrics() -> None:
    queued = figures(
        stage=JobStage.QUEUED, attempts=0, started_at=None, finished_at=None,
        cost_usd=0.0, tokens_in=0, tokens_out=0,
    )
    text = echo_comment(queued, ItemStatus.IN_PROGRESS, NOW)
    assert "duration" not in text
    assert "cost" not in text
    assert "tokens" not in text
    assert text.splitlines()[1:] == ["- stage: QUEUED", "- attempts: 0/3"]


def test_echo_comment_shows_tokens_when_only_one_direction_is_known() -> None:
    text = echo_comment(figures(tokens_in=0, tokens_out=7), ItemStatus.DONE, NOW)
    assert "- tokens: 0 in / 7 out" in text.splitlines()


def test_echo_comment_never_reports_a_negative_duration() -> None:
    skewed = figures(started_at=NOW + timedelta(seconds=5), finished_at=NOW)
    assert "- duration: 0.0s" in echo_comment(skewed, ItemStatus.DONE, NOW).splitlines()


def test_echo_comment_lines_are_only_known_metrics() -> None:
    prefixes = ("fleetbridge: job ", "- stage: ", "- attempts: ", "- duration: ", "- cost: $",
                "- tokens: ")
    for stage, status in [(JobStage.FAILED, ItemStatus.BLOCKED),
                          (JobStage.SHIPPED, ItemStatus.DONE),
                          (JobStage.REVIEW, ItemStatus.IN_PROGRESS)]:
        text = echo_comment(figures(stage=stage), status, NOW)
        assert all(line.startswith(prefixes) for line in text.splitlines())
        assert len(text.splitlines()) == 6


# -- item → job spec -------------------------------------------------------------


def item(**overrides: object) -> Item:
    values: dict[str, object] = {
        "id": 7, "product_id": "p", "title": "T", "description": "", "labels": [],
        "status": ItemStatus.TODO,
    }
    values.update(overrides)
    return Item(**values)


def test_job_spec_maps_title_key_and_item() -> None:
    spec = job_spec_for_item(item(description="Do **this**"), IngestOptions())
    assert spec.title == "T"
    assert spec.body_md == "Do **this**"
    assert spec.tracker_item_id == 7
    assert spec.idempotency_key == "tracker-7"
    assert spec.priority == Priority.NORMAL
    assert spec.capabilities == ()
    assert spec.engine_class is None
    assert spec.profile is None
    assert spec.kind == "code"
    assert spec.max_attempts == 3
    assert spec.budget is None


@pytest.mark.parametrize(
    "description",
    ["  leading and trailing  \n", "line one\r\nline two\n\n", "```py\nx = 1\n```", " "],
)
def test_body_is_the_description_verbatim(description: str) -> None:
    assert job_spec_for_item(item(description=description), IngestOptions()).body_md == (
        description
    )


def test_body_is_the_title_when_the_description_is_empty() -> None:
    spec = job_spec_for_item(item(title="Fix login", description=""), IngestOptions())
    assert spec.body_md == "Fix login"


def test_labels_become_hints() -> None:
    labelled = item(labels=["engine-class:agentic-coder", "priority:high", "cap:os:mac", "bug"])
    spec = job_spec_for_item(labelled, IngestOptions())
    assert spec.engine_class == "agentic-coder"
    assert spec.priority == Priority.HIGH
    assert spec.capabilities == ("os:mac",)
    assert spec.profile is None


def test_options_override_labels() -> None:
    labelled = item(labels=[
        "engine-class:agentic-coder", "priority:high", "cap:os:mac", "profile:fast",
    ])
    options = IngestOptions(
        priority=Priority.LOW, capabilities=("gpu",), engine_class="reviewer",
        profile="cheap", kind="review", max_attempts=5, budget=2.5,
    )
    spec = job_spec_for_item(labelled, options)
    assert spec.priority == Priority.LOW
    assert spec.capabilities == ("gpu",)
    assert spec.engine_class == "reviewer"
    assert spec.profile == "cheap"
    assert spec.kind == "review"
    assert spec.max_attempts == 5
    assert spec.budget == 2.5
    assert spec.idempotency_key == "tracker-7"


def test_options_override_only_what_they_set() -> None:
    labelled = item(labels=["priority:urgent", "cap:gpu", "profile:fast"])
    spec = job_spec_for_item(labelled, IngestOptions(engine_class="coder"))
    assert spec.engine_class == "coder"
    assert spec.priority == Priority.URGENT
    assert spec.capabilities == ("gpu",)
    assert spec.profile == "fast"


def test_an_explicit_empty_capability_list_overrides_the_labels() -> None:
    spec = job_spec_for_item(item(labels=["cap:gpu"]), IngestOptions(capabilities=()))
    assert spec.capabilities == ()


def test_a_bad_priority_label_is_refused_even_when_options_set_the_priority() -> None:
    with pytest.raises(BadUserInputError) as caught:
        job_spec_for_item(item(labels=["priority:someday"]), IngestOptions(priority=Priority.LOW))
    assert caught.value.field == "labels"
    assert "priority:someday" in caught.value.message


# -- the echo rules (who owns the item's status) -----------------------------------


def plan(**overrides: object) -> EchoPlan:
    values: dict[str, object] = {
        "stage": JobStage.BUILDING, "job_last_status": None, "terminal_pending": False,
        "item_status": ItemStatus.TODO, "bridge_status": None, "latest": True,
    }
    values.update(overrides)
    return plan_echo(**values)  # type: ignore[arg-type]


def test_the_first_echo_owns_a_todo_item() -> None:
    assert plan() == EchoPlan(ItemStatus.IN_PROGRESS, True, ItemStatus.IN_PROGRESS)


@pytest.mark.parametrize("status", [ItemStatus.BLOCKED, ItemStatus.DONE])
def test_before_the_first_echo_only_todo_is_the_bridges(status: ItemStatus) -> None:
    assert plan(item_status=status) == EchoPlan(None, True, None)


def test_the_bridge_owns_the_status_it_wrote_last() -> None:
    assert plan(stage=JobStage.FAILED, job_last_status=ItemStatus.IN_PROGRESS,
                terminal_pending=True, item_status=ItemStatus.IN_PROGRESS,
                bridge_status=ItemStatus.IN_PROGRESS) == EchoPlan(
        ItemStatus.BLOCKED, True, ItemStatus.BLOCKED)


@pytest.mark.parametrize("person", [ItemStatus.TODO, ItemStatus.DONE])
def test_a_persons_status_wins_and_the_comment_is_still_written(person: ItemStatus) -> None:
    result = plan(stage=JobStage.FAILED, job_last_status=ItemStatus.IN_PROGRESS,
                  terminal_pending=True, item_status=person,
                  bridge_status=ItemStatus.IN_PROGRESS)
    assert result == EchoPlan(None, True, ItemStatus.IN_PROGRESS)


def test_an_older_job_comments_only_and_does_not_take_the_status() -> None:
    result = plan(stage=JobStage.FAILED, job_last_status=ItemStatus.IN_PROGRESS,
                  item_status=ItemStatus.DONE, bridge_status=ItemStatus.DONE, latest=False,
                  terminal_pending=True)
    assert result == EchoPlan(None, True, ItemStatus.DONE)


def test_a_cancelled_item_is_never_reopened_yet_gets_the_final_comment() -> None:
    common = {"item_status": ItemStatus.CANCELLED, "bridge_status": ItemStatus.IN_PROGRESS}
    assert plan(stage=JobStage.REVIEW, **common) == EchoPlan(None, False,
                                                               ItemStatus.IN_PROGRESS)
    assert plan(stage=JobStage.SHIPPED, terminal_pending=True, **common) == EchoPlan(
        None, True, ItemStatus.IN_PROGRESS)


def test_an_unchanged_outcome_writes_nothing() -> None:
    assert plan(job_last_status=ItemStatus.IN_PROGRESS, item_status=ItemStatus.IN_PROGRESS,
                bridge_status=ItemStatus.IN_PROGRESS) == EchoPlan(
        None, False, ItemStatus.IN_PROGRESS)
    # a person's status that the job already reported: no second comment
    assert plan(job_last_status=ItemStatus.IN_PROGRESS, item_status=ItemStatus.TODO,
                bridge_status=ItemStatus.IN_PROGRESS).comment is False


def test_a_cancelled_job_writes_its_final_comment_and_no_status() -> None:
    result = plan(stage=JobStage.CANCELLED, terminal_pending=True,
                  job_last_status=ItemStatus.IN_PROGRESS, item_status=ItemStatus.IN_PROGRESS,
                  bridge_status=ItemStatus.IN_PROGRESS)
    assert result == EchoPlan(None, True, ItemStatus.IN_PROGRESS)


def test_the_latest_job_takes_a_status_the_item_already_shows() -> None:
    assert plan(item_status=ItemStatus.IN_PROGRESS).bridge_status == ItemStatus.IN_PROGRESS
    assert plan(item_status=ItemStatus.IN_PROGRESS, latest=False).bridge_status is None


def decide(**overrides: object) -> EchoPlan | None:
    values: dict[str, object] = {
        "stage": JobStage.BUILDING, "job_stage": JobStage.BUILDING, "echoed_stage": None,
        "job_last_status": None, "retry_pending": False, "item_status": ItemStatus.TODO,
        "bridge_status": None, "latest": True,
    }
    values.update(overrides)
    return decide_echo(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize("stage", list(JobStage))
def test_a_stage_echoed_already_writes_nothing_at_all(stage: JobStage) -> None:
    assert decide(stage=stage, job_stage=stage, echoed_stage=stage,
                  job_last_status=item_status_for_stage(stage)) is None


@pytest.mark.parametrize("stage", [JobStage.SHIPPED, JobStage.FAILED, JobStage.CANCELLED])
def test_the_current_terminal_stage_owes_its_final_comment(stage: JobStage) -> None:
    common = {"job_last_status": item_status_for_stage(stage), "echoed_stage": JobStage.TESTING,
              "item_status": ItemStatus.TODO, "bridge_status": ItemStatus.IN_PROGRESS}
    owed = decide(stage=stage, job_stage=stage, **common)
    assert owed is not None
    assert owed.comment is True
    # an older terminal stage the job has left (a retried job's earlier end) owes none
    assert decide(stage=stage, job_stage=JobStage.QUEUED, **common) == EchoPlan(
        None, False, ItemStatus.IN_PROGRESS)


ACTIVE = [JobStage.QUEUED, JobStage.ASSIGNED, JobStage.BUILDING, JobStage.REVIEW,
          JobStage.TESTING]
ENDED = [JobStage.SHIPPED, JobStage.FAILED, JobStage.CANCELLED]


def test_the_stages_that_have_not_ended_all_show_in_progress() -> None:
    assert same_status_stages() == {ItemStatus.IN_PROGRESS: frozenset(ACTIVE)}


@pytest.mark.parametrize("source", [None, *JobStage])
@pytest.mark.parametrize("target", list(JobStage))
def test_a_same_status_move_stays_within_the_stages_that_have_not_ended(
    source: JobStage | None, target: JobStage
) -> None:
    assert same_status_move(source, target) is (source in ACTIVE and target in ACTIVE)


@pytest.mark.parametrize("stage", list(JobStage))
@pytest.mark.parametrize("echoed", [None, *JobStage])
@pytest.mark.parametrize("last", [None, *ItemStatus])
@pytest.mark.parametrize("retry_pending", [False, True])
def test_an_echo_is_covered_only_by_a_completed_echo_of_the_same_status(
    stage: JobStage, echoed: JobStage | None, last: ItemStatus | None, retry_pending: bool
) -> None:
    expected = (stage in ACTIVE and echoed in ACTIVE and last == ItemStatus.IN_PROGRESS
                and not retry_pending)
    assert echo_covered(stage=stage, echoed_stage=echoed, job_last_status=last,
                        retry_pending=retry_pending) is expected


def test_a_move_the_item_already_shows_writes_nothing_at_all() -> None:
    shown = {"echoed_stage": JobStage.QUEUED, "job_last_status": ItemStatus.IN_PROGRESS,
             "item_status": ItemStatus.IN_PROGRESS, "bridge_status": ItemStatus.IN_PROGRESS}
    assert decide(stage=JobStage.BUILDING, **shown) is None
    # a person's status is left alone, and nothing is recorded either
    assert decide(stage=JobStage.BUILDING, **{**shown, "item_status": ItemStatus.TODO}) is None
    # the item's status back to what the job shows: the bridge takes it as its own again
    assert decide(stage=JobStage.BUILDING, **{**shown, "bridge_status": ItemStatus.DONE}) == (
        EchoPlan(None, False, ItemStatus.IN_PROGRESS))
    # a failed echo still waits for its retry: this echo completes it
    assert decide(stage=JobStage.BUILDING, retry_pending=True, **shown) == EchoPlan(
        None, False, ItemStatus.IN_PROGRESS)
    # the first echo of the job (the QUEUED one failed): status and comment
    assert decide(stage=JobStage.BUILDING, **{**shown, "echoed_stage": None,
                                              "job_last_status": None,
                                              "item_status": ItemStatus.TODO,
                                              "bridge_status": None}) == EchoPlan(
        ItemStatus.IN_PROGRESS, True, ItemStatus.IN_PROGRESS)
    # an end is never covered: its final comment is owed
    ended = decide(stage=JobStage.CANCELLED, job_stage=JobStage.CANCELLED, **shown)
    assert ended is not None
    assert ended.comment is True


def test_a_final_comment_always_shows_the_totals() -> None:
    cancelled = figures(stage=JobStage.CANCELLED, started_at=None, finished_at=None,
                        cost_usd=0.0, tokens_in=0, tokens_out=0)
    assert echo_comment(cancelled, None, NOW).splitlines() == [
        "fleetbridge: job 42 is CANCELLED; the item's status is left as is.",
        "- stage: CANCELLED",
        "- attempts: 2/3",
        "- cost: $0.0000",
        "- tokens: 0 in / 0 out",
    ]
