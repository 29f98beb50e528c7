// mdb-realtime browser client: a plain ES module, no build step.
//
//   import { RealtimeClient } from "/static/realtime.js";
//   const client = new RealtimeClient("/todo/ws", { token });
//   client.subscribe("todos", { snapshot: true });
//   client.on("view", ({ collection }) => render(client.documents(collection)));
//   client.connect();
//
// After a lost connection it reconnects with backoff and `last_event_id` (the last change it
// saw), so the server replays what it missed. With no position yet, or after
// `resync_required`, subscriptions made with `snapshot: true` ask for a snapshot to rebuild
// the local view. The Python client (engine/client.py) follows the same rules.

import { ClientRooms } from "./rooms.js";

const POLICY_VIOLATION = 1008; // the server refused the token
const TOKEN_EXPIRED = "token expired";
// Refusals a fresh token (or ticket) from getToken can cure: the client reconnects.
const RENEWABLE = new Set([TOKEN_EXPIRED, "identity changed", "invalid ticket"]);
const REFRESH_MARGIN_MS = 60000; // refresh this long before expiry (less for short tokens)
const RETRY_MS = 5000; // after a refused refresh, try again this soon (if time is left)
const UPSERT = new Set(["insert", "update", "replace"]);

/** A Map key for a JSON `_id`; the prefixes keep "1", 1 and true apart. */
export function documentKey(id) {
  if (typeof id === "string") return `s:${id}`;
  if (typeof id === "number") return `n:${id}`;
  return `j:${canonicalJson(id)}`;
}

function canonicalJson(value) {
  if (Array.isArray(value)) return `[${value.map(canonicalJson).join(",")}]`;
  if (value && typeof value === "object") {
    const keys = Object.keys(value).sort();
    return `{${keys.map((k) => `${JSON.stringify(k)}:${canonicalJson(value[k])}`).join(",")}}`;
  }
  return JSON.stringify(value ?? null);
}

/** Documents per collection, kept from `change`, `transaction` and `snapshot` messages (no I/O). */
export class LocalView {
  constructor(lastEventId = null) {
    this.collections = new Map(); // collection -> Map(key -> document)
    this.windows = new Map(); // window id -> {sort, limit, documents: Map(key -> document)}
    this.windowOf = new Map(); // subscription id -> window id
    this.lastEventId = lastEventId;
  }

  /** A window subscription's documents in its order (SPEC 13); null before its snapshot. */
  window(subscriptionId) {
    const window = this.windows.get(this.windowOf.get(subscriptionId));
    if (!window) return null;
    const compare = (left, right) => {
      for (const [path, direction] of window.sort) {
        const order = compareJson(sortValue(left, path, direction < 0), sortValue(right, path, direction < 0));
        if (order) return order * direction;
      }
      return 0;
    };
    return [...window.documents.values()].sort(compare);
  }

  documents(collection) {
    return [...(this.collections.get(collection)?.values() ?? [])];
  }

  /** Apply a server message; the collection it changed, or null. */
  apply(message) {
    if (message.type === "change") return this.#applyChange(message);
    if (message.type === "snapshot") return this.#applySnapshot(message);
    if (message.type === "transaction") return this.#applyTransaction(message);
    return null;
  }

  /** Every change of a transaction in one call: nobody observes half of it. */
  #applyTransaction(message) {
    let changed = null;
    for (const change of Array.isArray(message.changes) ? message.changes : []) {
      if (change && typeof change === "object") changed = this.#applyChange(change) ?? changed;
    }
    if (typeof message.id === "string") this.lastEventId = message.id;
    return changed;
  }

  #collection(name) {
    let documents = this.collections.get(name);
    if (!documents) this.collections.set(name, (documents = new Map()));
    return documents;
  }

  #applyChange(message) {
    if (typeof message.id === "string") this.lastEventId = message.id;
    if (typeof message.collection !== "string") return null;
    let documents;
    if (message.window !== undefined) {
      documents = this.windows.get(message.window)?.documents;
      if (!documents) return null;
    } else {
      documents = this.#collection(message.collection);
    }
    const key = documentKey(message.document_id);
    if (message.operation === "delete") {
      return documents.delete(key) ? message.collection : null;
    }
    if (UPSERT.has(message.operation) && message.document && typeof message.document === "object") {
      documents.set(key, message.document);
      return message.collection;
    }
    return null;
  }

  #applySnapshot(message) {
    if (typeof message.collection !== "string") return null;
    const documents = new Map();
    for (const document of message.documents ?? []) documents.set(documentKey(document._id), document);
    if (typeof message.window === "string") {
      const sort = Object.entries(message.sort ?? { _id: 1 });
      this.windows.set(message.window, { sort, limit: message.limit, documents });
      this.windowOf.set(message.id, message.window);
    } else {
      this.collections.set(message.collection, documents);
    }
    if (typeof message.event_id === "string") this.lastEventId = message.event_id;
    return message.collection;
  }
}

// BSON's order for the JSON types a client sees: null < numbers < strings < objects < arrays
// < booleans (ObjectIds and dates arrive as strings and sort as such).
function jsonRank(value) {
  if (value === null || value === undefined) return 1;
  if (typeof value === "number") return 2;
  if (typeof value === "string") return 3;
  if (Array.isArray(value)) return 5;
  if (typeof value === "object") return 4;
  if (typeof value === "boolean") return 8;
  return 9;
}

function compareJson(left, right) {
  if (left === EMPTY_ARRAY || right === EMPTY_ARRAY) return (right === EMPTY_ARRAY) - (left === EMPTY_ARRAY);
  const rank = jsonRank(left) - jsonRank(right);
  if (rank) return Math.sign(rank);
  if (left === null || left === undefined) return 0;
  if (typeof left === "object") return Math.sign(canonicalJson(left).localeCompare(canonicalJson(right)));
  return left < right ? -1 : left > right ? 1 : 0;
}

const EMPTY_ARRAY = Symbol("empty array");

// The value MongoDB sorts a document by: missing is null, an array by its smallest element
// (largest when descending).
function sortValue(document, path, descending) {
  let values = [document];
  for (const part of path.split(".")) {
    const next = [];
    for (const value of values) {
      if (Array.isArray(value)) {
        for (const element of value) if (element && typeof element === "object") next.push(element[part]);
      } else if (value && typeof value === "object") next.push(value[part]);
      else next.push(undefined);
    }
    values = next;
  }
  const leaves = values.flatMap((value) => (Array.isArray(value) ? value : [value]));
  if (!leaves.length) return EMPTY_ARRAY;
  return leaves.reduce((best, value) => {
    const order = compareJson(value, best);
    return (descending ? order > 0 : order < 0) ? value : best;
  });
}

/** Delay before reconnect attempt n, in ms: initial x factor^n, capped, with jitter. */
export function backoffDelay(attempt, { initialMs = 500, maxMs = 15000, factor = 2, jitter = 0.5 } = {}) {
  const ceiling = Math.min(maxMs, initialMs * factor ** Math.max(0, attempt));
  return ceiling * (1 - jitter * Math.random());
}

export class RealtimeClient {
  /**
   * @param {string} url  ws:// or wss:// URL, or a path such as "/todo/ws" on this page's host.
   * @param {object} options
   *   token: a string, or a function returning a string or a Promise of one (called at each
   *          connect, so an expired token can be replaced);
   *   getToken: a function returning a token or a Promise of one, used instead of `token`:
   *          called on each connect and before the token expires, when the fresh token is
   *          handed over on the open connection (`{"type": "auth"}`) without reconnecting;
   *   useTicket: trade the token for a single-use ticket (`POST /<slug>/ticket`) on each
   *          connect, so the token never appears in a URL;
   *   lastEventId: resume from this position on the first connect;
   *   backoff: {initialMs, maxMs, factor, jitter}.
   */
  constructor(
    url,
    { token = null, getToken = null, useTicket = false, lastEventId = null, backoff = {} } = {},
  ) {
    this.url = absoluteWebSocketUrl(url);
    this.view = new LocalView(lastEventId);
    this.state = "idle"; // idle, connecting, open, waiting (to reconnect), closed
    this.connected = null; // the last `connected` message
    this.failure = null; // {code, reason} once the client stopped for good
    this._token = getToken ?? token;
    this._useTicket = useTicket;
    this._refreshes = typeof getToken === "function"; // a `token` function is read on connect only
    this._identity = new TokenRenewal((message) => this.send(message));
    this._backoff = backoff;
    this._subscriptions = new Map();
    this._callbacks = new Map();
    this._nextId = 1;
    this._socket = null;
    this._timer = null;
    this._attempt = 0;
    this._closing = false;
    this._rooms = new ClientRooms((message) => this.send(message), (kind, message) => this.#emit(kind, message));
  }

  // -- rooms (SPEC 11; see rooms.js) ---------------------------------------------------------

  /** Join a room (joined again after reconnects); resolves with `joined`, rejects with a RoomError. */
  join(room, options = {}) {
    return this._rooms.join(room, options);
  }

  leave(room) {
    return this._rooms.leave(room);
  }

  /** Publish to a room; resolves with the message id. */
  publish(room, data) {
    return this._rooms.publish(room, data);
  }

  /** The members of a joined room with presence: [{user_id, connection_id, info}]. */
  members(room) {
    return this._rooms.members(room);
  }

  get lastEventId() {
    return this.view.lastEventId;
  }

  documents(collection) {
    return this.view.documents(collection);
  }

  /**
   * Call `callback(message)` for server messages of type `kind` ("*": every one). Also:
   * "view" ({collection}) when the local view changed, "status" ({state}) on state changes,
   * "disconnected" ({code, reason}), "closed" ({code, reason}) when the client stops for good.
   * Returns a function that removes the callback.
   */
  on(kind, callback) {
    if (!this._callbacks.has(kind)) this._callbacks.set(kind, new Set());
    this._callbacks.get(kind).add(callback);
    return () => this._callbacks.get(kind).delete(callback);
  }

  connect() {
    this._closing = false;
    if (!this._socket && this._timer === null) this.#open();
    return this;
  }

  close() {
    this._closing = true;
    clearTimeout(this._timer);
    this._timer = null;
    this._identity.stop();
    if (this._socket) this._socket.close(1000, "client closed");
    this.#setState("closed");
  }

  /** A window subscription's documents in its order; null before its snapshot. */
  window(id) {
    return this.view.window(id);
  }

  /** Send a message to the app's handler; false when not connected. */
  send(message) {
    if (this.state !== "open") return false;
    this._socket.send(JSON.stringify(message));
    return true;
  }

  /** Narrow what arrives from `collection` (kept across reconnects); the subscription id. */
  /** With `limit` (and `sort`), a live window: `window(id)` is its documents in order. */
  subscribe(collection, { filter = null, fields = null, snapshot = true, id = null, sort = null, limit = null } = {}) {
    if (limit !== null) snapshot = true; // a window always starts from its snapshot
    const subscription = { id: id ?? `sub-${this._nextId++}`, collection, filter, fields, snapshot, sort, limit };
    this._subscriptions.set(subscription.id, subscription);
    if (this.state === "open") this.send(subscribeMessage(subscription, snapshot));
    return subscription.id;
  }

  unsubscribe(id) {
    if (this._subscriptions.delete(id)) this.send({ type: "unsubscribe", id });
  }

  // -- connection ----------------------------------------------------------------------------

  async #open() {
    this.#setState("connecting");
    let token = this._token;
    try {
      if (typeof token === "function") token = await token();
    } catch (error) {
      this.#emit("error", { type: "error", code: "token_source", message: String(error) });
      this.#scheduleReconnect();
      return;
    }
    if (this._closing) return;
    const url = new URL(this.url);
    url.searchParams.delete("ticket");
    if (token && this._useTicket) {
      try {
        url.searchParams.set("ticket", await fetchTicket(this.url, token));
      } catch (error) {
        this.#emit("error", { type: "error", code: "ticket", message: String(error) });
        this.#scheduleReconnect();
        return;
      }
      if (this._closing) return;
    } else if (token) {
      url.searchParams.set("token", token);
    }
    this._identity.connectingWith(this._refreshes ? this._token : null, token);
    if (this.view.lastEventId !== null) url.searchParams.set("last_event_id", this.view.lastEventId);
    const socket = new WebSocket(url);
    this._socket = socket;
    socket.onmessage = (event) => this.#receive(socket, event.data);
    socket.onclose = (event) => this.#closed(socket, event.code, event.reason);
  }

  #closed(socket, code, reason) {
    if (this._socket !== socket) return;
    this._socket = null;
    this._identity.stop();
    if (this._closing) return;
    if (code === POLICY_VIOLATION && !(typeof this._token === "function" && RENEWABLE.has(reason))) {
      this.failure = { code, reason };
      this.#setState("closed");
      this.#emit("closed", { type: "closed", code, reason });
      return;
    }
    this.#emit("disconnected", { type: "disconnected", code, reason });
    this.#scheduleReconnect();
  }

  #scheduleReconnect() {
    this.#setState("waiting");
    const delay = backoffDelay(this._attempt++, this._backoff);
    this._timer = setTimeout(() => {
      this._timer = null;
      if (!this._closing) this.#open();
    }, delay);
  }

  // -- messages ------------------------------------------------------------------------------

  #receive(socket, data) {
    let message;
    try {
      message = JSON.parse(data);
    } catch {
      return;
    }
    if (!message || typeof message !== "object") return;
    if (message.type === "ping") {
      socket.send('{"type":"pong"}');
    } else if (message.type === "connected") {
      this.#opened(socket, message);
      this._identity.opened();
    } else if (message.type === "auth_ok") {
      this._identity.answered(message);
    } else if (message.type === "resync_required") {
      this.#resubscribe(socket, true);
    } else {
      // An error may answer a token refresh, a room request or a subscription.
      if (message.type === "error") this._identity.answered(message);
      const collection = this.view.apply(message);
      if (collection !== null) this.#emit("view", { type: "view", collection });
      const position = this._rooms.handle(message);
      if (position !== null) this.view.lastEventId = position;
    }
    this.#emit(message.type, message);
    this.#emit("*", message);
  }

  #opened(socket, message) {
    this.connected = message;
    this._attempt = 0;
    this.#setState("open");
    // With a position the server replays what was missed: subscriptions only narrow again.
    // Without one, snapshots rebuild the views.
    this.#resubscribe(socket, false);
    this._rooms.rejoin();
  }

  #resubscribe(socket, snapshotOnly) {
    const fresh = this.view.lastEventId === null;
    for (const subscription of this._subscriptions.values()) {
      if (snapshotOnly && !subscription.snapshot) continue;
      const snapshot = subscription.snapshot && (fresh || snapshotOnly);
      socket.send(JSON.stringify(subscribeMessage(subscription, snapshot)));
    }
  }

  #setState(state) {
    if (this.state === state) return;
    this.state = state;
    this.#emit("status", { type: "status", state });
  }

  #emit(kind, message) {
    for (const callback of this._callbacks.get(kind) ?? []) {
      try {
        callback(message);
      } catch (error) {
        console.error(`realtime callback for ${kind} failed`, error);
      }
    }
  }
}

/** The token's `exp` in ms as the client reads it (the server checks the signature). */
export function tokenExpiry(token) {
  try {
    const payload = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const exp = JSON.parse(atob(payload.padEnd(Math.ceil(payload.length / 4) * 4, "="))).exp;
    return typeof exp === "number" ? exp * 1000 : null;
  } catch {
    return null;
  }
}

/** `ws(s)://host/<slug>/...` -> `http(s)://host/<slug>/ticket`. */
export function ticketUrl(webSocketUrl) {
  const url = new URL(webSocketUrl);
  url.protocol = url.protocol === "wss:" ? "https:" : "http:";
  url.pathname = `/${url.pathname.split("/")[1]}/ticket`;
  url.search = "";
  return url.toString();
}

async function fetchTicket(webSocketUrl, token) {
  const response = await fetch(ticketUrl(webSocketUrl), {
    method: "POST",
    headers: { Authorization: `Bearer ${token}` },
  });
  if (!response.ok) throw new Error(`ticket refused (${response.status})`);
  return (await response.json()).ticket;
}

/** Refreshes the open connection's token before it expires (`{"type": "auth"}`). */
class TokenRenewal {
  constructor(send) {
    this._send = send;
    this._getToken = null;
    this._token = null;
    this._timer = null;
    this._expiresAt = null;
    this._waitingFor = null;
    this._count = 0;
  }

  connectingWith(getToken, token) {
    this._getToken = getToken;
    this._token = token;
  }

  opened() {
    if (this._getToken && this._token) this.#schedule(tokenExpiry(this._token));
  }

  answered(message) {
    if (this._waitingFor === null) return;
    if (message.type === "auth_ok" && message.id === this._waitingFor) {
      this._waitingFor = null;
      this.#schedule(Date.parse(message.expires_at));
    } else if (message.type === "error" && message.ref === this._waitingFor) {
      this._waitingFor = null;
      if (this._expiresAt - Date.now() > RETRY_MS) this.#refreshIn(RETRY_MS);
    }
  }

  stop() {
    clearTimeout(this._timer);
    this._timer = null;
    this._waitingFor = null;
  }

  #schedule(expiresAt) {
    this.stop();
    if (!expiresAt || Number.isNaN(expiresAt)) return;
    this._expiresAt = expiresAt;
    const remaining = expiresAt - Date.now();
    this.#refreshIn(Math.max(0, remaining - Math.min(REFRESH_MARGIN_MS, remaining / 5)));
  }

  #refreshIn(delay) {
    clearTimeout(this._timer);
    this._timer = setTimeout(async () => {
      this._timer = null;
      let token;
      try {
        token = await this._getToken();
      } catch (error) {
        console.error("the token source failed; the connection closes at expiry", error);
        return;
      }
      this._waitingFor = `auth-${++this._count}`;
      this._send({ type: "auth", id: this._waitingFor, token });
    }, delay);
  }
}

function subscribeMessage({ id, collection, filter, fields, sort, limit }, snapshot) {
  const message = { type: "subscribe", id, collection };
  if (filter) message.filter = filter;
  if (fields) message.fields = fields;
  if (snapshot) message.snapshot = true;
  if (limit !== null && limit !== undefined) {
    message.limit = limit;
    if (sort) message.sort = sort;
  }
  return message;
}

function absoluteWebSocketUrl(url) {
  if (/^wss?:\/\//.test(url)) return url;
  const base = new URL(url, globalThis.location?.href);
  base.protocol = base.protocol === "https:" ? "wss:" : "ws:";
  return base.toString();
}
