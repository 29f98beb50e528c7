"""Which views of one binding could be concerned by a change, without asking all of them.

Each view is in exactly one place:
- `everyone`: views that see every document of the binding in full (no filter, no scope, no
  subscription). They all get the same decision, so one of them decides for the group.
- the key index: views whose scope, subscriptions or binding filter imply equalities
  (`engine.delivery.keys`), filed under each (path, key). A change reads those paths in its
  post-image and pre-image and finds the views filed under the values there.
- `unindexed`: views whose predicates imply no equality (ranges, `$regex`, `$ne`, ...); they
  are asked on every change, as every view once was.
Views that can never see anything (a scoped binding and a principal without the value) are
in none of them.

Two more ways a view can be concerned, both only when a change is not an insert: it was sent
the document before (its delivered ids, indexed here by id), or the change has no pre-image
and the view is unrestricted (its delete cannot be checked, so it is sent).

Views are returned as candidates; `View.decide` still makes every decision, so the index can
only make routing cheaper, never different.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any

from engine.changes import ChangeEvent
from engine.delivery.keys import EqualityKeys, equality_keys, smallest
from engine.delivery.view import Binding, View, id_key
from engine.query import path_reader, value_key


class RecipientIndex:
    """The views of one binding, filed so that a change finds the few it concerns."""

    def __init__(self, binding: Binding) -> None:
        self.binding = binding
        self.filter_keys = equality_keys(binding.filter.query)
        self.everyone: dict[View, None] = {}  # ordered: attach order
        self.unindexed: dict[View, None] = {}
        self.unrestricted_filed: set[View] = set()  # filed by subscriptions, unrestricted
        self._filed: dict[str, dict[Hashable, set[View]]] = {}  # path -> key -> views
        self._readers: dict[str, Callable[[Any], Sequence[Any]]] = {}
        self._keys_of: dict[View, EqualityKeys] = {}
        self._known: dict[Hashable, set[View]] = {}  # delivered document id -> views

    # -- filing --------------------------------------------------------------------------------

    def place(self, view: View) -> None:
        """File a view (again, after its subscriptions changed)."""
        self._unfile(view)
        if view.never:
            return
        if view.sees_everything:
            self.everyone[view] = None
            return
        keys = self._keys_for(view)
        if keys is None:
            self.unindexed[view] = None
            return
        self._keys_of[view] = keys
        for path, key in keys:
            by_key = self._filed.get(path)
            if by_key is None:
                by_key = self._filed[path] = {}
                self._readers[path] = path_reader(path)
            by_key.setdefault(key, set()).add(view)
        if view.unrestricted:
            self.unrestricted_filed.add(view)

    def remove(self, view: View) -> None:
        """Forget a view entirely (its connection has gone)."""
        self._unfile(view)
        for key in view.known_ids:
            self.drop_known(key, view)

    def _keys_for(self, view: View) -> EqualityKeys | None:
        """The most selective equalities the view implies: its own (scope, subscriptions)
        before the binding filter's, which every view of the binding shares."""
        scope_keys = equality_keys(view.scope.query) if view.scope is not None else None
        subscription_keys = _subscription_keys(view)
        own = smallest((scope_keys, subscription_keys))
        return own if own is not None else self.filter_keys

    def _unfile(self, view: View) -> None:
        self.everyone.pop(view, None)
        self.unindexed.pop(view, None)
        self.unrestricted_filed.discard(view)
        keys = self._keys_of.pop(view, None)
        if keys is None:
            return
        for path, key in keys:
            by_key = self._filed[path]
            views = by_key[key]
            views.discard(view)
            if not views:
                del by_key[key]
                if not by_key:
                    del self._filed[path]
                    del self._readers[path]

    # -- delivered ids -------------------------------------------------------------------------

    def note_known(self, key: Hashable, view: View) -> None:
        self._known.setdefault(key, set()).add(view)

    def drop_known(self, key: Hashable, view: View) -> None:
        views = self._known.get(key)
        if views is not None:
            views.discard(view)
            if not views:
                del self._known[key]

    # -- lookup --------------------------------------------------------------------------------

    def candidates(self, event: ChangeEvent) -> Iterable[View]:
        """Views outside `everyone` that may get something for `event`, each once."""
        found: set[View] = set()
        if self._filed:
            for document in (event.document, event.before):
                if document is not None:
                    self._collect(document, found)
        if event.operation != "insert":
            known = self._known.get(id_key(event.document_id))
            if known:
                found |= known
            if event.before is None and self.unrestricted_filed:
                found |= self.unrestricted_filed
        if not self.unindexed:
            return found
        # A copy: a decision may close a connection, and closing may detach views.
        return [*self.unindexed, *(view for view in found if view not in self.unindexed)]

    def _collect(self, document: Any, found: set[View]) -> None:
        for path, by_key in self._filed.items():
            for value in self._readers[path](document):
                key = value_key(value)
                if key is not None:
                    views = by_key.get(key)
                    if views:
                        found |= views

    def size(self) -> int:
        """How many views are filed anywhere (for tests and figures)."""
        return len(self.everyone) + len(self.unindexed) + len(self._keys_of)


def _subscription_keys(view: View) -> EqualityKeys | None:
    """A view with subscriptions sees a document only if one of them matches it."""
    if not view.subscriptions:
        return None
    union: set[tuple[str, Hashable]] = set()
    for subscription in view.subscriptions.values():
        keys = equality_keys(subscription.filter.query)
        if keys is None:
            return None
        union |= keys
    return frozenset(union)
