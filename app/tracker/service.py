"""Tracker logic: items and comments.  Callers pass validated inputs and commit."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession

from app.db import utcnow
from app.errors import NotFoundError
from app.events.models import EventType
from app.events.outbox import record_event
from app.pagination import Page, decode_cursor, make_page
from app.tracker import repository
from app.tracker.models import Comment, CommentKind, Item, ItemStatus

ITEM_CURSOR = "item"
COMMENT_CURSOR = "comment"


@dataclass(frozen=True, slots=True)
class NewItem:
    title: str
    description: str = ""
    labels: tuple[str, ...] = ()
    status: ItemStatus = ItemStatus.TODO


@dataclass(frozen=True, slots=True)
class ItemChanges:
    """Fields left `None` are unchanged."""

    title: str | None = None
    description: str | None = None
    labels: tuple[str, ...] | None = None
    status: ItemStatus | None = None


async def get_item(session: AsyncSession, product_id: str, item_id: int) -> Item:
    item = await repository.get_item(session, product_id, item_id)
    if item is None:
        raise NotFoundError("item", item_id)
    return item


async def list_items(
    session: AsyncSession,
    product_id: str,
    *,
    status: ItemStatus | None = None,
    label: str | None = None,
    first: int = 50,
    after: str | None = None,
) -> Page[Item]:
    rows = await repository.list_items(
        session,
        product_id,
        status=status,
        label=label,
        after_id=decode_cursor(ITEM_CURSOR, after),
        limit=first + 1,
    )
    return make_page(ITEM_CURSOR, rows, first, lambda item: item.id, after=after)


async def list_comments(
    session: AsyncSession, product_id: str, item_id: int, *, first: int, after: str | None
) -> Page[Comment]:
    rows = await repository.list_comments(
        session, product_id, item_id, after_id=decode_cursor(COMMENT_CURSOR, after),
        limit=first + 1,
    )
    return make_page(COMMENT_CURSOR, rows, first, lambda comment: comment.id, after=after)


async def first_comment_pages(
    session: AsyncSession, product_id: str, item_ids: Sequence[int], *, first: int
) -> dict[int, Page[Comment]]:
    """The first page of comments of each of `item_ids` (for a list of items)."""
    rows = await repository.first_comments_of_items(
        session, product_id, item_ids, limit=first + 1
    )
    by_item: dict[int, list[Comment]] = {item_id: [] for item_id in item_ids}
    for row in rows:
        by_item[row.item_id].append(row)
    return {
        item_id: make_page(COMMENT_CURSOR, comments, first, lambda comment: comment.id)
        for item_id, comments in by_item.items()
    }


async def create_item(session: AsyncSession, product_id: str, new: NewItem) -> Item:
    now = utcnow()
    item = Item(
        product_id=product_id,
        title=new.title,
        description=new.description,
        labels=list(new.labels),
        status=new.status,
        created_at=now,
        updated_at=now,
    )
    session.add(item)
    await session.flush()
    await record_event(
        session,
        product_id=product_id,
        type=EventType.ITEM_CREATED,
        entity_id=item.id,
        to_state=item.status.value,
    )
    return item


async def update_item(
    session: AsyncSession, product_id: str, item_id: int, changes: ItemChanges
) -> Item:
    item = await repository.get_item(session, product_id, item_id, for_update=True)
    if item is None:
        raise NotFoundError("item", item_id)
    if changes.title is not None:
        item.title = changes.title
    if changes.description is not None:
        item.description = changes.description
    if changes.labels is not None:
        item.labels = list(changes.labels)
    item.updated_at = utcnow()
    if changes.status is not None:
        await set_status(session, item, changes.status)
    await session.flush()
    return item


async def set_status(session: AsyncSession, item: Item, status: ItemStatus) -> bool:
    """Move `item` to `status`, recording the change; False when it already was."""
    if item.status == status:
        return False
    previous = item.status
    item.status = status
    item.updated_at = utcnow()
    await session.flush()
    await record_event(
        session,
        product_id=item.product_id,
        type=EventType.ITEM_STATUS_CHANGED,
        entity_id=item.id,
        from_state=previous.value,
        to_state=status.value,
    )
    return True


async def add_comment(
    session: AsyncSession,
    product_id: str,
    item_id: int,
    *,
    body: str,
    author: str,
    kind: CommentKind = CommentKind.USER,
) -> Comment:
    item = await repository.get_item(session, product_id, item_id)
    if item is None:
        raise NotFoundError("item", item_id)
    comment = Comment(
        product_id=product_id, item_id=item.id, body=body, author=author, kind=kind,
        created_at=utcnow(),
    )
    session.add(comment)
    await session.flush()
    await record_event(
        session,
        product_id=product_id,
        type=EventType.COMMENT_ADDED,
        entity_id=comment.id,
        payload={"itemId": item.id, "kind": kind.value},
    )
    return comment
