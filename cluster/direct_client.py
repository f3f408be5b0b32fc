"""The front end's end of an engine process's :mod:`~accordion.cluster.direct_server` socket (asyncio).

One connection per instance. ``submit_groups`` sends submissions and awaits the engine's verdict; ``abort`` is
fire-and-forget, ordered after the submissions on the same socket. A reader task hands every step frame's outputs
(as :class:`EngineOutput` / :class:`RequestMoved`) and load to ``on_step`` (on the event loop) and, when the
connection ends, fails the pending submissions and calls ``on_lost`` once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from itertools import count

from accordion.cluster.errors import EngineUnavailableError
from accordion.cluster.load import LoadReport
from accordion.cluster.outputs import plain_output
from accordion.cluster.wire_codec import HEADER, CodecError, decode_payload, encode_frame, frame_length

logger = logging.getLogger(__name__)


class DirectClient:
    """Build with :meth:`connect`."""

    def __init__(self, name: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 on_step: Callable[[list, LoadReport], None], on_lost: Callable[[str], None]):
        self.name = name
        self._reader, self._writer = reader, writer
        self._on_step, self._on_lost = on_step, on_lost
        self._seq = count()
        self._pending: dict[int, asyncio.Future] = {}
        self.lost: str | None = None
        self._task = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def connect(cls, name: str, address: str, token: str, on_step: Callable[[list, LoadReport], None],
                      on_lost: Callable[[str], None], timeout_s: float = 10.0) -> DirectClient:
        """Open the connection and present the token (raises OSError / TimeoutError)."""
        host, _, port = address.rpartition(":")
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host.strip("[]"), int(port)), timeout_s)
        writer.write(encode_frame(("hello", token)))
        return cls(name, reader, writer, on_step, on_lost)

    async def submit_groups(self, groups: list[list]) -> list[Exception | None]:
        """Per group (each all or none): None (accepted) or the typed error that refused it. Raises
        EngineUnavailableError when the connection is gone."""
        if self.lost is not None:
            raise EngineUnavailableError(f"{self.name}: {self.lost}")
        seq = next(self._seq)
        fut = asyncio.get_running_loop().create_future()
        self._pending[seq] = fut
        self._writer.write(encode_frame(("submit", seq, groups)))
        return await fut

    def abort(self, request_ids: list[str]) -> None:
        if self.lost is None and request_ids:
            self._writer.write(encode_frame(("abort", list(request_ids))))

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._end("closed")

    async def _read(self) -> None:
        reason = "the engine closed the connection"
        try:
            while True:
                n = frame_length(await self._reader.readexactly(HEADER.size))
                msg = decode_payload(await self._reader.readexactly(n))
                if msg[0] == "step":
                    _, rows, others, load = msg
                    self._on_step([plain_output(r) for r in rows] + others, load)
                elif msg[0] == "reply":
                    fut = self._pending.pop(msg[1], None)
                    if fut is not None and not fut.done():
                        fut.set_result(msg[2])
        except asyncio.CancelledError:
            raise
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as e:
            reason = f"the engine connection broke ({type(e).__name__})"
        except CodecError as e:
            reason = f"bad frame from the engine: {e}"
        except Exception as e:  # on_step raised: a bug here, but the requests must not hang
            logger.exception("%s: direct connection handler failed", self.name)
            reason = f"{type(e).__name__}: {e}"
        self._end(reason)

    def _end(self, reason: str) -> None:
        if self.lost is not None:
            return
        self.lost = reason
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(EngineUnavailableError(f"{self.name}: {reason}"))
        self._pending.clear()
        self._writer.close()
        self._on_lost(reason)
