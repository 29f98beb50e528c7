"""Rooms and presence (SPEC 11): channels that clients join, publish to and see each other in.

The pure core -- room name patterns (`patterns`), join rules (`rules`), presence state and
batched presence frames (`presence`), room documents on the bus (`documents`), the clients'
room state (`clientside`) -- is kept apart from the I/O edges: the MongoDB presence store
(`store`), room history reads (`history`) and the service that ties rooms to connections and
the bus (`service`). Import the service from `engine.rooms.service`; this package itself
stays light so the manifest models can use the core.
"""
