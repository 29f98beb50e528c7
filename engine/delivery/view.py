"""What one connection may see of one binding, and what it was sent (pure, no I/O).

A `View` decides, for one change event, what its connection gets: the change itself, a
`delete` with reason `left_scope` when the document moved out of what it may see, or
nothing. The recipient index (`engine.delivery.index`) only chooses which views to ask.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from engine import codec
from engine.changes import ChangeEvent, Fields, union_fields
from engine.query import Matcher

if TYPE_CHECKING:
    from engine.delivery.index import RecipientIndex
    from engine.hub import WebSocketConnection

LEFT_SCOPE = "left_scope"
DEFAULT_KNOWN_IDS_LIMIT = 10_000


@dataclass(frozen=True, eq=False)
class Binding:
    """One `watch` entry of one endpoint, resolved to its physical namespace."""

    app_slug: str
    endpoint: str
    collection: str
    database: str
    physical: str
    operations: frozenset[str]
    filter: Matcher
    scope: Mapping[str, Any] | None
    fields: Fields


class Decision(NamedTuple):
    """What one connection gets for one event; equal decisions share one encoded frame."""

    operation: str
    reason: str | None
    fields: Fields
    describe_update: bool


@dataclass(frozen=True)
class Subscription:
    id: Hashable
    collection: str
    filter: Matcher
    fields: Fields
    window: bool = False  # a window's place here: its changes come from the window itself


def id_key(document_id: Any) -> Hashable:
    """A dictionary key per _id; booleans kept apart from numbers (True == 1 in Python only)."""
    if isinstance(document_id, bool):
        return ("bool", document_id)
    return document_id if isinstance(document_id, Hashable) else codec.dumps(document_id)


@dataclass(eq=False)
class View:
    """What one connection may see of one binding, and what it was sent.

    Without a pre-image, a delete or an update cannot be checked against the document as it
    was; the view then relies on the ids it delivered (bounded), so it never leaks a delete of
    a document the connection could not see.

    Subscriptions change only through `add_subscription` / `drop_subscription`, and delivered
    ids only through `decide` / `remember`, so the recipient index always knows the view.
    """

    binding: Binding
    scope: Matcher | None  # None with a scoped binding: this principal never matches
    known_ids_limit: int = DEFAULT_KNOWN_IDS_LIMIT
    owner: WebSocketConnection | None = None
    index: RecipientIndex | None = None
    subscriptions: dict[Hashable, Subscription] = field(default_factory=dict)
    known_ids: OrderedDict[Hashable, None] = field(default_factory=OrderedDict)

    @property
    def never(self) -> bool:
        return self.binding.scope is not None and self.scope is None

    @property
    def unrestricted(self) -> bool:
        """The binding lets this connection see every document of the collection."""
        return self.binding.filter.matches_everything and self.binding.scope is None

    @property
    def sees_everything(self) -> bool:
        """Every change of the binding reaches this view, and as the same decision."""
        return self.unrestricted and not self.subscriptions

    def add_subscription(self, subscription: Subscription) -> None:
        self.subscriptions[subscription.id] = subscription
        if self.index is not None:
            self.index.place(self)

    def drop_subscription(self, sub_id: Hashable) -> bool:
        if self.subscriptions.pop(sub_id, None) is None:
            return False
        if self.index is not None:
            self.index.place(self)
        return True

    def sees(self, document: Mapping[str, Any]) -> bool:
        if self.never or not self.binding.filter(document):
            return False
        if self.scope is not None and not self.scope(document):
            return False
        if not self.subscriptions:
            return True
        return any(sub.filter(document) for sub in self.subscriptions.values())

    def fields_for(self, document: Mapping[str, Any]) -> Fields:
        if not self.subscriptions:
            return self.binding.fields
        matching = [s.fields for s in self.subscriptions.values() if s.filter(document)]
        return union_fields(matching)

    def _was_visible(self, event: ChangeEvent) -> bool:
        # What it was sent counts too: an update whose post-image was already gone (deleted
        # right after) could not move the document out of this view.
        if id_key(event.document_id) in self.known_ids:
            return True
        if event.before is not None:
            return self.sees(event.before)
        return self.unrestricted  # at worst a delete of a document outside a subscription

    def remember(self, document_id: Any) -> None:
        """Note a document this connection was sent (only restricted views need to)."""
        if self.unrestricted:
            return
        key = id_key(document_id)
        if key in self.known_ids:
            self.known_ids.move_to_end(key)
            return
        self.known_ids[key] = None
        if self.index is not None:
            self.index.note_known(key, self)
        if len(self.known_ids) > self.known_ids_limit:
            evicted, _ = self.known_ids.popitem(last=False)
            if self.index is not None:
                self.index.drop_known(evicted, self)

    def _forget(self, document_id: Any) -> None:
        key = id_key(document_id)
        if self.known_ids.pop(key, 0) is None and self.index is not None:
            self.index.drop_known(key, self)

    @property
    def windows_only(self) -> bool:
        """Every subscription is a window: the plain stream sends this view nothing."""
        return bool(self.subscriptions) and all(s.window for s in self.subscriptions.values())

    def decide(self, event: ChangeEvent) -> Decision | None:
        """(operation, reason, fields) this connection gets for `event`, or None."""
        if self.never or self.windows_only:
            return None
        operation = event.operation
        if operation == "delete":
            was_visible = self._was_visible(event)
            self._forget(event.document_id)
            return Decision("delete", None, None, False) if was_visible else None
        document = event.document
        if document is None:  # deleted right after; its delete event follows
            return None
        if self.sees(document):
            self.remember(event.document_id)
            # An update description from a lookup (no pre-image) may show a state this
            # connection could not see: only unrestricted views get it then.
            describe = event.exact or self.unrestricted
            return Decision(operation, None, self.fields_for(document), describe)
        if operation != "insert" and self._was_visible(event):
            self._forget(event.document_id)
            return Decision("delete", LEFT_SCOPE, None, False)
        return None
