"""Loading weights (layerlie.model.loading): the check that the weights' host answers gives up
in bounded time, whatever the network does."""

from __future__ import annotations

import socket
import time

from layerlie.model import loading


def test_reachability_check_is_bounded_in_time(monkeypatch):
    with socket.create_server(("127.0.0.1", 0)) as server:
        assert loading._reachable(f"http://127.0.0.1:{server.getsockname()[1]}")
    assert not loading._reachable("http://127.0.0.1:9")

    def stalled(*args: object, **kwargs: object) -> None:  # a DNS lookup that hangs, then gives up
        time.sleep(2)
        raise TimeoutError

    monkeypatch.setattr(socket, "create_connection", stalled)
    start = time.perf_counter()
    assert not loading._reachable("https://huggingface.co", timeout=0.2)
    assert time.perf_counter() - start < 1
