"""The engine's change-stream positions, persisted in MongoDB so a restart resumes there."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping
from typing import Any

from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import PyMongoError

logger = logging.getLogger("engine.checkpoints")

CHECKPOINT_COLLECTION = "_mdb_realtime_checkpoints"


class CheckpointStore:
    """One document per watched database: {_id: database, token, updated_at}."""

    def __init__(self, collection: AsyncCollection[dict[str, Any]]) -> None:
        self.collection = collection
        self._saved: dict[str, Mapping[str, Any]] = {}

    async def load(self, database: str) -> Mapping[str, Any] | None:
        try:
            document = await self.collection.find_one({"_id": database})
        except PyMongoError as error:
            logger.warning("cannot read the checkpoint of %r: %s", database, error)
            return None
        token = document.get("token") if document else None
        if token is not None:
            self._saved[database] = token
        return token

    async def save(self, database: str, token: Mapping[str, Any] | None) -> None:
        """Store `token` unless it is the one stored last (no write when nothing moved)."""
        if token is None or self._saved.get(database) == token:
            return
        try:
            await self.collection.update_one(
                {"_id": database},
                {"$set": {"token": dict(token), "updated_at": dt.datetime.now(dt.UTC)}},
                upsert=True,
            )
        except PyMongoError as error:
            logger.warning("cannot save the checkpoint of %r: %s", database, error)
            return
        self._saved[database] = token
