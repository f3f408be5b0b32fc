"""The engine side of a front-end socket (cluster/direct_server.py) in isolation: the engine thread's step frames
when the front end stops reading, so the socket's buffers fill and writes come back partial."""

from __future__ import annotations

import socket
import threading

import pytest

from accordion.cluster.direct_server import DirectServer, recv_frame
from accordion.cluster.load import LoadReport
from accordion.cluster.request import Request, SamplingParams
from accordion.cluster.wire_codec import encode_frame

pytestmark = pytest.mark.timeout(120)


def test_step_outputs_arrive_whole_and_in_order_through_a_full_socket():
    submitted = []
    server = DirectServer("127.0.0.1", submit=submitted.extend, abort=lambda ids: None)
    host, port = server.address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)))
    try:
        sock.sendall(encode_frame(("hello", server.token)))
        sock.sendall(encode_frame(("submit", 0, [[Request(request_id="r0", prompt_token_ids=[5, 6],
                                                          sampling_params=SamplingParams())]])))
        reply = recv_frame(sock)
        assert reply[0] == "reply" and list(reply[2]) == [None] and [r.request_id for r in submitted] == ["r0"]

        steps, per_step = 300, 20000  # ~18 MB of rows: far more than the socket buffers hold unread
        def engine():  # the engine thread: route() must return every time, whatever the reader does
            for i in range(steps):
                rest = server.route([("r0", [i] * per_step, 2, 0)], LoadReport("i0", num_running=i))
                assert rest == []

        pushing = threading.Thread(target=engine, daemon=True)
        pushing.start()
        pushing.join(60)
        assert not pushing.is_alive(), "the engine thread blocked on a socket nobody reads"

        step, loads = 0, []
        while step < steps:
            kind, rows, others, load = recv_frame(sock)
            assert kind == "step" and list(others) == []
            for rid, new, num_prompt, num_cached in rows:  # one row per step, in order, none cut
                assert (rid, num_prompt, num_cached) == ("r0", 2, 0)
                assert list(new) == [step] * per_step
                step += 1
            loads.append(load.num_running)
        assert loads == sorted(loads) and loads[-1] == steps - 1
        assert len(loads) < steps  # steps that piled up while the reader lagged went out merged
    finally:
        sock.close()
        server.close()
