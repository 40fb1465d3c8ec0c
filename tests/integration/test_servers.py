"""The server fixtures start real servers that answer on loopback (the base every integration test stands on)."""

from __future__ import annotations

import socket
import struct

import pytest

pytestmark = pytest.mark.integration


def test_redis_answers_set_and_get(redis_url: str) -> None:
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$7\r\ncambium\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n")
        reply = b""
        while not reply.endswith(b"cambium\r\n"):
            chunk = s.recv(64)
            assert chunk, f"connection closed after {reply!r}"
            reply += chunk
    assert reply == b"+OK\r\n$7\r\ncambium\r\n"


def test_postgres_accepts_a_startup_message(postgres_dsn: str) -> None:
    port = int(postgres_dsn.rsplit(":", 1)[1].split("/")[0])
    params = b"user\x00postgres\x00database\x00postgres\x00\x00"
    startup = struct.pack("!ii", 8 + len(params), 196608) + params
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(startup)
        kind = s.recv(1)
        length = struct.unpack("!i", s.recv(4))[0]
        body = s.recv(length - 4)
    # 'R' with code 0 is AuthenticationOk (trust auth): the server is up and accepts our user.
    assert kind == b"R" and struct.unpack("!i", body[:4])[0] == 0
