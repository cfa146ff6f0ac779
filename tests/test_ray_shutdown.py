"""Shutting Ray down while another thread of the driver is busy in Python, as MLflow's trace export is.

A Ray object freed by the cyclic GC while `ray.shutdown()` tears the core worker down ends the process
(`_Exit(1)`, issue 17), so no collection may start in any thread during the shutdown. Ray is not started
here: `ray.shutdown` is replaced by a stand-in that takes a while, as the real one does.
"""

from __future__ import annotations

import gc
import threading
import time

import ray

from distill.serving.control import shutdown_ray


def test_no_thread_starts_a_garbage_collection_while_ray_shuts_down(monkeypatch) -> None:
    in_shutdown = threading.Event()
    stop = threading.Event()
    during: list[str] = []

    def record(phase: str, info: dict) -> None:
        if phase == "start" and in_shutdown.is_set():
            during.append(threading.current_thread().name)

    def slow_shutdown() -> None:
        in_shutdown.set()
        time.sleep(0.5)  # the other thread allocates meanwhile
        in_shutdown.clear()

    def busy() -> None:  # container allocations: what sets off the cyclic GC
        while not stop.is_set():
            junk = [[i] for i in range(1000)]
            junk.append(junk)

    monkeypatch.setattr(ray, "shutdown", slow_shutdown)
    gc.callbacks.append(record)
    thread = threading.Thread(target=busy, name="busy")
    thread.start()
    try:
        time.sleep(0.1)
        shutdown_ray()
        assert gc.isenabled()  # on again after the shutdown
        time.sleep(0.1)
    finally:
        stop.set()
        thread.join()
        gc.callbacks.remove(record)
    assert during == []
