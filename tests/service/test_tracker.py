"""Tracker service functions (both stores): items, comments, their events, filters,
cursor pagination and product isolation."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from app.auth.models import Role
from app.errors import BadUserInputError, NotFoundError
from app.events.models import Event, EventType
from app.graphql.context import Services
from app.pagination import Page
from app.tracker import service as tracker_service
from app.tracker.models import Comment, CommentKind, Item, ItemStatus
from app.tracker.service import ItemChanges, NewItem

PRODUCT = "acme"
OTHER_PRODUCT = "globex"


@pytest.fixture
async def tracker(services: Services, make_token: Any) -> Services:
    await make_token(PRODUCT, Role.MEMBER)
    await make_token(OTHER_PRODUCT, Role.MEMBER)
    return services


async def create(services: Services, product: str = PRODUCT, **fields: Any) -> Item:
    fields.setdefault("title", "an item")
    fields["labels"] = tuple(fields.get("labels", ()))
    async with services.db.unit_of_work() as session:
        return await tracker_service.create_item(session, product, NewItem(**fields))


async def update(services: Services, item_id: int, product: str = PRODUCT,
                 **changes: Any) -> Item:
    if "labels" in changes:
        changes["labels"] = tuple(changes["labels"])
    async with services.db.unit_of_work() as session:
        return await tracker_service.update_item(session, product, item_id,
                                                 ItemChanges(**changes))


async def comment(services: Services, item_id: int, body: str,
                  product: str = PRODUCT) -> Comment:
    async with services.db.unit_of_work() as session:
        return await tracker_service.add_comment(session, product, item_id, body=body,
                                                 author="ada")


async def get(services: Services, item_id: int, product: str = PRODUCT) -> Item:
    async with services.db.read() as session:
        return await tracker_service.get_item(session, product, item_id)


async def list_items(services: Services, product: str = PRODUCT, **filters: Any) -> Page[Item]:
    async with services.db.read() as session:
        return await tracker_service.list_items(session, product, **filters)


async def list_comments(services: Services, item_id: int, first: int = 50,
                        after: str | None = None, product: str = PRODUCT) -> Page[Comment]:
    async with services.db.read() as session:
        return await tracker_service.list_comments(session, product, item_id, first=first,
                                                   after=after)


async def events(services: Services, *types: EventType) -> list[tuple[Any, ...]]:
    async with services.db.read() as session:
        rows = await session.execute(
            select(Event.product_id, Event.type, Event.entity_id, Event.from_state,
                   Event.to_state).where(Event.type.in_(types)).order_by(Event.id))
    return [tuple(row) for row in rows.all()]


async def all_ids(services: Services, page_size: int, **filters: Any) -> list[int]:
    """Walk every page with first/after and check each page's pageInfo."""
    ids: list[int] = []
    after: str | None = None
    while True:
        page = await list_items(services, first=page_size, after=after, **filters)
        assert len(page.nodes) <= page_size
        ids.extend(item.id for item in page.nodes)
        if not page.has_next_page:
            return ids
        assert len(page.nodes) == page_size
        assert page.end_cursor is not None
        after = page.end_cursor


async def test_create_and_update_items_record_events(tracker: Services) -> None:
    item = await create(tracker, title="Login is flaky", description="steps: 1. log in",
                        labels=["bug", "ui"])
    stored = await get(tracker, item.id)
    assert (stored.title, stored.description, stored.labels, stored.status) == (
        "Login is flaky", "steps: 1. log in", ["bug", "ui"], ItemStatus.TODO)
    assert stored.product_id == PRODUCT
    started = await create(tracker, title="already going", status=ItemStatus.IN_PROGRESS)
    assert await events(tracker, EventType.ITEM_CREATED) == [
        (PRODUCT, EventType.ITEM_CREATED, item.id, None, "TODO"),
        (PRODUCT, EventType.ITEM_CREATED, started.id, None, "IN_PROGRESS"),
    ]

    await update(tracker, item.id, title="Login fails", labels=["bug"], status=ItemStatus.TODO)
    edited = await get(tracker, item.id)
    assert (edited.title, edited.description, edited.labels, edited.status) == (
        "Login fails", "steps: 1. log in", ["bug"], ItemStatus.TODO)
    assert edited.updated_at >= stored.updated_at
    assert await events(tracker, EventType.ITEM_STATUS_CHANGED) == []  # TODO → TODO

    await update(tracker, item.id, status=ItemStatus.BLOCKED)
    await update(tracker, item.id, status=ItemStatus.BLOCKED)
    await update(tracker, item.id, description="")
    await update(tracker, item.id, status=ItemStatus.DONE)
    final = await get(tracker, item.id)
    assert (final.status, final.description, final.title) == (ItemStatus.DONE, "", "Login fails")
    assert await events(tracker, EventType.ITEM_STATUS_CHANGED) == [
        (PRODUCT, EventType.ITEM_STATUS_CHANGED, item.id, "TODO", "BLOCKED"),
        (PRODUCT, EventType.ITEM_STATUS_CHANGED, item.id, "BLOCKED", "DONE"),
    ]


async def test_list_items_filters_by_status_and_label(tracker: Services) -> None:
    bug = await create(tracker, labels=["bug", "ui"])
    bugfix = await create(tracker, labels=["bugfix"])
    done_bug = await create(tracker, labels=["bug"], status=ItemStatus.DONE)
    plain = await create(tracker)
    await create(tracker, OTHER_PRODUCT, labels=["bug"])

    assert [i.id for i in (await list_items(tracker)).nodes] == [
        bug.id, bugfix.id, done_bug.id, plain.id]
    assert [i.id for i in (await list_items(tracker, label="bug")).nodes] == [
        bug.id, done_bug.id]
    todo = await list_items(tracker, status=ItemStatus.TODO)
    assert [i.id for i in todo.nodes] == [bug.id, bugfix.id, plain.id]
    both = await list_items(tracker, status=ItemStatus.DONE, label="bug")
    assert [i.id for i in both.nodes] == [done_bug.id]
    assert (await list_items(tracker, label="bu")).nodes == []
    nothing = await list_items(tracker, status=ItemStatus.CANCELLED)
    assert (list(nothing.nodes), nothing.has_next_page, nothing.end_cursor) == ([], False, None)


async def test_list_items_paginates_with_cursors(tracker: Services) -> None:
    created = [(await create(tracker, title=f"item {n}", labels=["even"] if n % 2 == 0 else []))
               .id for n in range(7)]
    await create(tracker, OTHER_PRODUCT)

    first = await list_items(tracker, first=3)
    assert [i.id for i in first.nodes] == created[:3]
    assert first.has_next_page is True
    second = await list_items(tracker, first=3, after=first.end_cursor)
    assert [i.id for i in second.nodes] == created[3:6]
    last = await list_items(tracker, first=3, after=second.end_cursor)
    assert [i.id for i in last.nodes] == created[6:]
    assert last.has_next_page is False
    assert last.end_cursor is not None
    beyond = await list_items(tracker, first=3, after=last.end_cursor)
    assert (list(beyond.nodes), beyond.has_next_page, beyond.end_cursor) == ([], False, None)
    exact = await list_items(tracker, first=7)
    assert (len(exact.nodes), exact.has_next_page) == (7, False)

    assert await all_ids(tracker, 1) == created
    assert await all_ids(tracker, 2, label="even") == created[0::2]
    with pytest.raises(BadUserInputError, match="after"):
        await list_items(tracker, after="not-a-cursor")
    await comment(tracker, created[0], "hi")
    comment_cursor = (await list_comments(tracker, created[0])).end_cursor
    with pytest.raises(BadUserInputError):  # a cursor of another list is refused
        await list_items(tracker, after=comment_cursor)


async def test_comments_are_added_and_listed_in_pages(tracker: Services) -> None:
    item = await create(tracker)
    other_item = await create(tracker)
    bodies = [f"note {n} — ✓" for n in range(5)]
    added = [await comment(tracker, item.id, body) for body in bodies]
    await comment(tracker, other_item.id, "elsewhere")
    assert all((c.kind, c.author, c.item_id) == (CommentKind.USER, "ada", item.id)
               for c in added)

    first = await list_comments(tracker, item.id, first=2)
    assert [c.body for c in first.nodes] == bodies[:2]
    assert first.has_next_page is True
    rest = await list_comments(tracker, item.id, first=10, after=first.end_cursor)
    assert [c.body for c in rest.nodes] == bodies[2:]
    assert rest.has_next_page is False
    assert [c.id for c in (await list_comments(tracker, item.id, first=5)).nodes] == [
        c.id for c in added]
    assert (await list_comments(tracker, item.id, first=5)).has_next_page is False

    async with tracker.db.read() as session:
        rows = (await session.execute(
            select(Event.entity_id, Event.payload)
            .where(Event.type == EventType.COMMENT_ADDED).order_by(Event.seq))).all()
    assert [row[0] for row in rows] == [*(c.id for c in added), rows[-1][0]]
    assert all(row[1] == {"itemId": item.id, "kind": "USER"} for row in rows[:5])
    # a comment leaves the item's status alone
    assert await events(tracker, EventType.ITEM_STATUS_CHANGED) == []


async def test_another_product_cannot_read_or_write_our_items(tracker: Services) -> None:
    item = await create(tracker, labels=["bug"])
    await comment(tracker, item.id, "ours")
    before = await get(tracker, item.id)
    async with tracker.db.read() as session:
        event_count = len((await session.execute(select(Event.id))).all())

    with pytest.raises(NotFoundError):
        await get(tracker, item.id, product=OTHER_PRODUCT)
    with pytest.raises(NotFoundError):
        await update(tracker, item.id, product=OTHER_PRODUCT, status=ItemStatus.CANCELLED)
    with pytest.raises(NotFoundError):
        await comment(tracker, item.id, "intrusion", product=OTHER_PRODUCT)
    with pytest.raises(NotFoundError):
        await get(tracker, item.id + 1_000)
    assert (await list_items(tracker, OTHER_PRODUCT)).nodes == []
    assert (await list_items(tracker, OTHER_PRODUCT, label="bug")).nodes == []
    assert (await list_comments(tracker, item.id, product=OTHER_PRODUCT)).nodes == []

    after = await get(tracker, item.id)
    assert (after.status, after.updated_at, after.labels) == (
        before.status, before.updated_at, before.labels)
    assert [c.body for c in (await list_comments(tracker, item.id)).nodes] == ["ours"]
    async with tracker.db.read() as session:
        assert len((await session.execute(select(Event.id))).all()) == event_count
