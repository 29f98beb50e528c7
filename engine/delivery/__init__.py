"""From a change to the sockets that may see it.

- `view`: what one connection may see of one binding, and the decision for one change;
- `keys`: the equalities a query implies, which the index files views under;
- `index`: per binding, which views a change could concern (the recipient index);
- `members`: an app's connections, also by user, for broadcasts;
- `subscriptions`: checking `subscribe` / `unsubscribe` messages;
- `router`: bindings, and the dispatch of changes, transactions and broadcasts to the views'
  connections;
- `windows`: a sorted, limited window's state and the messages a change makes (pure);
- `window_groups`: windows shared by the connections that ask for the same one, kept by the
  database (load, refills, held changes);
- `window_index`: per binding, which windows a change could concern.
"""
