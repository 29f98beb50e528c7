// Rooms and presence for the browser client (SPEC 11); RealtimeClient uses this, no I/O here.
//
//   await client.join("doc:42", { info: { name: "Ann" }, history: true,
//                                 onMessage: (m) => show(m.data),
//                                 onPresence: (members) => render(members) });
//   await client.publish("doc:42", { text: "hi" });
//   client.members("doc:42");   // [{user_id, connection_id, info}, ...]
//   await client.leave("doc:42");
//
// Rooms are joined again after every reconnect; with the resume position the server sends
// the room messages missed meanwhile (rooms with `history`). A message already seen (same
// `message_id`) is never passed on twice. Members are kept by connection id: `joined`
// gives the list, `presence` frames (one event, or `events` for several) change it.

const SEEN_LIMIT = 1000; // message ids remembered per room to drop repeats

export class RoomError extends Error {
  constructor(message) {
    super(message.message ?? message.code);
    this.code = message.code;
    this.reply = message;
  }
}

export class ClientRooms {
  /** @param send (message) => boolean; @param emit (kind, message) => void */
  constructor(send, emit) {
    this._send = send;
    this._emit = emit;
    this._rooms = new Map(); // room -> {info, history, onMessage, onPresence, members, seen}
    this._waiting = new Map(); // request id -> {resolve, reject, message}
    this._nextId = 1;
  }

  join(room, { info = null, history = false, onMessage = null, onPresence = null } = {}) {
    const entry = { info, history, onMessage, onPresence, members: new Map(), seen: [] };
    this._rooms.set(room, entry);
    return this._request(this._joinMessage(room, entry));
  }

  leave(room) {
    this._rooms.delete(room);
    return this._request({ type: "leave", room });
  }

  publish(room, data) {
    return this._request({ type: "publish", room, data }).then((reply) => reply.message_id);
  }

  members(room) {
    return [...(this._rooms.get(room)?.members.values() ?? [])];
  }

  get joined() {
    return [...this._rooms.keys()];
  }

  /** After (re)connecting: join every room again. A publish still unanswered is refused
   *  (it may or may not have gone out; sending it again could repeat it). */
  rejoin() {
    const joins = new Map();
    for (const [id, waiting] of this._waiting) {
      if (waiting.message.type === "join") {
        joins.set(waiting.message.room, id);
        continue;
      }
      this._waiting.delete(id);
      if (waiting.message.type === "leave") waiting.resolve({ type: "left", id, room: waiting.message.room });
      else waiting.reject(new RoomError({ code: "disconnected", message: "connection lost before the answer" }));
    }
    for (const [room, entry] of this._rooms) {
      const id = joins.get(room) ?? `room-${this._nextId++}`;
      this._send({ ...this._joinMessage(room, entry), id });
    }
  }

  /** Handle a server message; the resume position it carries (room messages), else null. */
  handle(message) {
    const waiting = this._waiting.get(message.type === "error" ? message.ref : message.id);
    if (message.type === "joined") this._joined(message);
    else if (message.type === "room_message") this._message(message);
    else if (message.type === "presence") this._presence(message);
    if (waiting && ["joined", "left", "published", "error"].includes(message.type)) {
      this._waiting.delete(message.type === "error" ? message.ref : message.id);
      if (message.type === "error") waiting.reject(new RoomError(message));
      else waiting.resolve(message);
    }
    return message.type === "room_message" && typeof message.id === "string" ? message.id : null;
  }

  _joinMessage(room, entry) {
    const message = { type: "join", room };
    if (entry.info !== null) message.info = entry.info;
    if (entry.history) message.history = true;
    return message;
  }

  _request(message) {
    const id = `room-${this._nextId++}`;
    return new Promise((resolve, reject) => {
      this._waiting.set(id, { resolve, reject, message });
      this._send({ ...message, id });
    });
  }

  _joined(message) {
    const entry = this._rooms.get(message.room);
    if (!entry) return;
    if (Array.isArray(message.members)) {
      entry.members = new Map(message.members.map((m) => [m.connection_id, m]));
      this._presenceChanged(message.room, entry, message);
    }
    for (const past of message.history ?? []) this._message({ ...past, room: message.room });
  }

  _message(message) {
    const entry = this._rooms.get(message.room);
    if (!entry || entry.seen.includes(message.message_id)) return;
    entry.seen.push(message.message_id);
    if (entry.seen.length > SEEN_LIMIT) entry.seen.shift();
    if (entry.onMessage) entry.onMessage(message);
  }

  _presence(message) {
    const entry = this._rooms.get(message.room);
    if (!entry) return;
    for (const { event, member } of message.events ?? [message]) {
      if (event === "join") entry.members.set(member.connection_id, member);
      else if (event === "leave") entry.members.delete(member.connection_id);
    }
    this._presenceChanged(message.room, entry, message);
  }

  _presenceChanged(room, entry, message) {
    const members = [...entry.members.values()];
    if (entry.onPresence) entry.onPresence(members, message);
    this._emit("members", { type: "members", room, members });
  }
}
