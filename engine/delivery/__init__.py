"""From a change to the sockets that may see it.

- `view`: what one connection may see of one binding, and the decision for one change;
- `keys`: the equalities a query implies, which the index files views under;
- `index`: per binding, which views a change could concern (the recipient index);
- `members`: an app's connections, also by user, for broadcasts;
- `subscriptions`: checking `subscribe` / `unsubscribe` messages;
- `router`: bindings, and the dispatch of changes and broadcasts to the views' connections.
"""
