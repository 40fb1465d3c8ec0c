"""The transports between shard workers and the parent (`cambium.screener.shards`): bytes, one message at a time.

`PipeChannel`, the embedded default: one multiprocessing pipe per worker. `RedisChannel` when `REDIS_URL` is set:
the workers XADD (`RedisSender`) to one stream `<namespace>:shards`, the parent XREADs it from where it started.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import multiprocessing.connection as mpc
from typing import Any

from cambium.core.errors import ConfigError

__all__ = ["PipeChannel", "RedisChannel", "RedisSender"]


class PipeChannel:
    """The embedded transport: the parent's ends of one pipe per worker."""

    def __init__(self) -> None:
        self.ends: dict[int, Any] = {}

    def open(self, worker: int) -> Any:
        """A new pipe for `worker` (replacing an old one); returns the worker's end (pass it to the process)."""
        ours, theirs = mp.Pipe(duplex=False)
        old = self.ends.pop(worker, None)
        if old is not None:
            old.close()
        self.ends[worker] = ours
        return theirs

    def receive(self, timeout: float) -> list[bytes]:
        out = []
        ready: list[Any] = mpc.wait(list(self.ends.values()), timeout)
        for conn in ready:
            try:
                while conn.poll():
                    out.append(conn.recv_bytes())
            except (EOFError, OSError):
                for w, c in list(self.ends.items()):
                    if c is conn:
                        del self.ends[w]
                        c.close()
        return out

    def close(self) -> None:
        for conn in self.ends.values():
            conn.close()
        self.ends.clear()


class RedisChannel:
    """Redis Streams: workers XADD to `<namespace>:shards`, the parent XREADs it from where it started."""

    def __init__(self, url: str, namespace: str) -> None:
        import redis

        self.url = url
        self.key = f"{namespace}:shards"
        try:
            self.r: Any = redis.Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=5.0)
            self.r.delete(self.key)
        except (ValueError, redis.RedisError) as exc:
            raise ConfigError(f"REDIS_URL: cannot use the Redis server for the shard transport: {exc}") from None
        self.last = "0-0"
        self.received = 0

    def receive(self, timeout: float) -> list[bytes]:
        got: Any = self.r.xread({self.key: self.last}, count=1000, block=max(1, int(timeout * 1000)))
        out: list[bytes] = []
        for _, entries in got or []:
            for entry_id, fields in entries:
                self.last = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                out.append(fields[b"m"])
        self.received += len(out)
        return out

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.r.delete(self.key)
            self.r.close()


class RedisSender:
    """A worker's end of the Redis transport: XADD each message to the parent's stream."""

    def __init__(self, url: str, key: str) -> None:
        import redis

        self.r = redis.Redis.from_url(url)
        self.key = key

    def send_bytes(self, data: bytes) -> None:
        self.r.xadd(self.key, {"m": data}, maxlen=100_000, approximate=True)
