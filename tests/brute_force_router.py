"""The reference for routing: every change (alone or in a transaction) asks every view of its
endpoint, every broadcast visits every connection of its app. The indexed `Router` must
deliver exactly what this does."""

from __future__ import annotations

from collections.abc import Iterator

from engine import codec
from engine.bus import parse_bus_document
from engine.changes import ChangeEvent
from engine.delivery.router import Router
from engine.delivery.view import Binding, Decision
from engine.hub import WebSocketConnection


class BruteForceRouter(Router):
    def _decisions(
        self, event: ChangeEvent, binding: Binding
    ) -> Iterator[tuple[WebSocketConnection, Decision]]:
        members = self._members.get(binding.app_slug)
        for connection in members.all() if members is not None else []:
            view = connection.views.get(binding.collection)
            if connection.endpoint != binding.endpoint or view is None or connection.closing:
                continue
            if connection.pending is not None:
                continue  # held by Router._hold_event
            decision = view.decide(event)
            if decision is not None:
                yield connection, decision

    def _route_broadcast(self, event: ChangeEvent) -> int:
        published = parse_bus_document(event.document or {})
        if published is None or published.origin == self.origin:
            return 0
        if self._app_databases.get(published.app_slug) != event.database:
            return 0
        members = self._members.get(published.app_slug)
        frame = codec.dumps(published.message)
        queued = 0
        for connection in members.all() if members is not None else []:
            if published.user_id is not None and connection.user_id != published.user_id:
                continue
            if connection.pending is not None:
                connection.pending.add(None, event)
            elif connection.send(frame):
                queued += 1
        return queued
