"""A compile worker that kills itself (SIGKILL, no cleanup) when it starts its `n`-th job, after finishing the ones
before: `python -m tests.integration._doomed_worker <consumer> <n> <namespace> <bucket> <root>`. Backends come from
the environment exactly as `cambium morph worker` takes them."""

from __future__ import annotations

import os
import signal
import sys
import threading

from cambium.morph.backends import Endpoints, open_bus, open_urza
from cambium.morph.contracts import CompilationRequest
from cambium.morph.worker import run_compile_worker


def main() -> None:
    consumer, n, namespace, bucket, root = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    ends = Endpoints.from_env(os.environ)
    started = 0

    def on_start(_: CompilationRequest) -> None:
        nonlocal started
        started += 1
        if started == n:
            os.kill(os.getpid(), signal.SIGKILL)

    run_compile_worker(open_bus(ends, namespace=namespace), open_urza(ends, root, bucket=bucket), consumer=consumer,
                       stop=threading.Event(), poll_s=0.2, benchmark_repeats=1, on_start=on_start)


if __name__ == "__main__":
    main()
