"""The engine process's socket for front ends: submissions, aborts and their outputs, without Ray in between.

Through Ray a token crossed four hops (engine process -> pipe -> instance actor -> Ray streaming generator -> front
end) and a submission three; on an H100 that cost the serving path ~9 ms of TTFT and a quarter of its throughput
(``bench/serving_overhead.py``). vLLM's front end talks to its engine core over a socket for the same reason. Ray
still creates, watches and drains instances, moves KV and runs sequence-parallel jobs; this path only carries
the requests a front end submits through it, and their outputs.

Security: it listens on the node's Ray address (loopback for a local cluster), each front end must first send the
token that travelled to it through Ray (compared in constant time), and frames are :mod:`.wire_codec` msgpack:
typed data, never pickle.

Protocol, after the token frame (``("hello", token)``):

* front end -> engine: ``("submit", seq, groups)`` (each group of requests all or none), ``("abort", ids)``;
* engine -> front end: ``("reply", seq, [None | typed error per group])``, ``("step", rows, others, load)`` with
  the outputs of this connection's requests and the load after the step: ``rows`` the plain token outputs as
  ``[request id, new token ids, prompt tokens, cached tokens]`` (msgpack's own arrays: cheap to encode), ``others``
  the rest (finished, logprobs, errors, :class:`RequestMoved`) in order; a request's rows always precede its other
  items. The engine thread writes a step's frame itself when the socket takes it at once (no thread hand-off per
  step); otherwise the connection's sender thread finishes it, and steps that pile up meanwhile are merged into
  one frame: the engine thread never waits on a socket.

A request's outputs go to the connection that submitted it until it finishes or moves (migration); outputs of
every other request (migrated here, sequence-parallel, submitted through Ray) go through Ray as before. When a
connection closes, its unfinished requests are aborted (nobody reads them any more), which frees their blocks.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import socket
import threading
from collections.abc import Callable

from accordion.cluster.errors import EngineOverloadedError, EngineUnavailableError, RequestValidationError
from accordion.cluster.load import LoadReport
from accordion.cluster.outputs import RequestMoved
from accordion.cluster.wire_codec import HEADER, CodecError, decode_payload, encode_frame, frame_length

logger = logging.getLogger(__name__)

_REFUSALS = (RequestValidationError, EngineOverloadedError, EngineUnavailableError)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed the connection")
        buf += chunk
    return bytes(buf)


HELLO_MAX_BYTES = 1024
"""The token frame is small: an unauthenticated peer cannot make the engine buffer more than this."""


def recv_frame(sock: socket.socket, max_bytes: int | None = None):
    """One decoded message from a blocking socket (raises ConnectionError / CodecError)."""
    n = frame_length(_recv_exact(sock, HEADER.size))
    if max_bytes is not None and n > max_bytes:
        raise CodecError(f"frame of {n} bytes where at most {max_bytes} were expected")
    return decode_payload(_recv_exact(sock, n))


class _Connection:
    """One front end: a reader thread (its submissions and aborts) and a sender thread (replies, and outputs the
    engine thread could not write at once)."""

    def __init__(self, server: DirectServer, sock: socket.socket, peer: str):
        self.server, self.sock, self.peer = server, sock, peer
        self._cond = threading.Condition()
        self._rows: list = []
        self._others: list = []
        self._load: LoadReport | None = None
        self._replies: list[tuple] = []
        self._unsent = b""
        """The rest of a frame the engine thread began writing (the socket took only part of it)."""
        self._sending = False
        """The sender thread is writing: nobody else may touch the socket."""
        self._closed = False
        self.authenticated = False
        """Set once the peer presented the token; until then it is sent nothing, not even load reports."""

    def start(self) -> None:
        threading.Thread(target=self._read, name=f"direct-read-{self.peer}", daemon=True).start()
        threading.Thread(target=self._send, name=f"direct-send-{self.peer}", daemon=True).start()

    def push(self, rows: list, others: list, load: LoadReport) -> None:
        """Send a step's outputs and load (engine thread; never blocks on the socket): written here when the
        socket is idle and takes the whole frame, else queued for the sender thread."""
        with self._cond:
            self._rows.extend(rows)
            self._others.extend(others)
            self._load = load
            if self._closed or self._sending or self._replies or self._unsent:
                self._cond.notify()
                return
            frame = encode_frame(("step", self._rows, self._others, load))
            self._rows, self._others, self._load = [], [], None
            try:
                sent = self.sock.send(frame, socket.MSG_DONTWAIT)
            except BlockingIOError:
                sent = 0
            except OSError:  # the reader notices the broken connection and closes it
                return
            if sent < len(frame):
                self._unsent = frame[sent:]
                self._cond.notify()

    def reply(self, seq: int, results: list) -> None:
        with self._cond:
            self._replies.append(("reply", seq, results))
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.server._closed(self)

    def _read(self) -> None:
        try:
            self.sock.settimeout(10.0)  # the hello comes at once or never
            kind, token = recv_frame(self.sock, HELLO_MAX_BYTES)
            if kind != "hello" or not isinstance(token, str) or not hmac.compare_digest(token, self.server.token):
                logger.warning("direct connection from %s refused: bad token", self.peer)
                return
            self.authenticated = True
            self.sock.settimeout(None)
            while True:
                msg = recv_frame(self.sock)
                if msg[0] == "submit":
                    self.reply(msg[1], [self.server.submit(self, group) for group in msg[2]])
                elif msg[0] == "abort":
                    self.server.abort(msg[1])
                else:
                    raise CodecError(f"unknown message {msg[0]!r}")
        except (ConnectionError, OSError, CodecError, ValueError, TypeError, IndexError) as e:
            if not self._closed:
                logger.info("direct connection from %s closed: %s", self.peer, e)
        finally:
            self.close()

    def _send(self) -> None:
        try:
            while True:
                with self._cond:
                    self._sending = False
                    while not (self._closed or self._replies or self._load is not None or self._unsent):
                        self._cond.wait()
                    if self._closed:
                        return
                    self._sending = True
                    unsent, self._unsent = self._unsent, b""
                    replies, self._replies = self._replies, []
                    rows, others, load = self._rows, self._others, self._load
                    self._rows, self._others, self._load = [], [], None
                frames = [unsent, *(encode_frame(r) for r in replies)]
                if load is not None:
                    frames.append(encode_frame(("step", rows, others, load)))
                self.sock.sendall(b"".join(frames))
        except (OSError, CodecError, TypeError) as e:
            logger.info("direct connection to %s: send failed: %s", self.peer, e)
            self.close()


class DirectServer:
    """Listens on ``host`` (an ephemeral port) for front ends of one engine loop.

    ``submit(requests)`` / ``abort(ids)``: the engine loop's (any thread). ``route(outputs, load)`` runs on the
    engine thread after each step and returns the outputs that are not any connection's (they go through Ray).
    """

    def __init__(self, host: str, submit: Callable[[list], None], abort: Callable[[list[str]], None]):
        self.token = secrets.token_hex(32)
        self._submit, self._abort = submit, abort
        self._lock = threading.Lock()
        self._conns: list[_Connection] = []
        self._owners: dict[str, _Connection] = {}
        self._refusal: str | None = None
        self._sock = socket.create_server((host, 0), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.address = f"{host}:{self._sock.getsockname()[1]}"
        threading.Thread(target=self._accept, name="direct-accept", daemon=True).start()

    def refuse(self, reason: str) -> None:
        """Refuse every submission from now on (the instance drains or stops)."""
        self._refusal = reason

    def close(self) -> None:
        self.refuse("stopped")
        try:
            self._sock.close()
        except OSError:
            pass
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            c.close()

    def _accept(self) -> None:
        while True:
            try:
                sock, addr = self._sock.accept()
            except OSError:  # closed
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Connection(self, sock, f"{addr[0]}:{addr[1]}")
            with self._lock:  # listed before it can submit: route() must know it
                self._conns.append(conn)
            conn.start()

    def _closed(self, conn: _Connection) -> None:
        with self._lock:
            if conn in self._conns:
                self._conns.remove(conn)
            orphans = [rid for rid, c in self._owners.items() if c is conn]
            for rid in orphans:
                del self._owners[rid]
        if orphans:
            logger.info("direct connection %s closed: aborting its %d unfinished request(s)", conn.peer, len(orphans))
            self._abort(orphans)

    def submit(self, conn: _Connection, requests: list) -> Exception | None:
        """One group, all or none: None, or the typed error that refused it."""
        if self._refusal is not None:
            return EngineUnavailableError(f"instance is {self._refusal}")
        ids = [r.request_id for r in requests]
        with self._lock:  # owned before the engine can emit anything for them
            for rid in ids:
                self._owners[rid] = conn
        try:
            self._submit(requests)
            return None
        except _REFUSALS as e:
            with self._lock:
                for rid in ids:
                    self._owners.pop(rid, None)
            return e

    def abort(self, request_ids: list[str]) -> None:
        self._abort([rid for rid in request_ids if isinstance(rid, str)])

    def route(self, outputs: list, load: LoadReport) -> list:
        """Hand each connection its requests' outputs (and every connection the load); the rest, returned, go
        through Ray. ``outputs`` in wire form."""
        with self._lock:
            if not any(c.authenticated for c in self._conns):
                return outputs
            mine: dict[_Connection, tuple[list, list]] = {c: ([], []) for c in self._conns if c.authenticated}
            rest = []
            for o in outputs:
                plain = type(o) is tuple
                rid = o[0] if plain else o.request_id
                conn = self._owners.get(rid)
                if conn is None or conn not in mine:
                    rest.append(o)
                elif plain:
                    mine[conn][0].append(list(o))
                else:
                    mine[conn][1].append(o)
                    if type(o) is RequestMoved or o.finished:
                        del self._owners[rid]
        for conn, (rows, others) in mine.items():
            conn.push(rows, others, load)
        return rest
