"""The workers' only way to a model: tritonclient over gRPC, one connection per process.

Errors are sorted into two kinds because they call for opposite actions: *unavailable* (server
down, model not loaded, deadline passed) means wait and retry the job; anything else Triton
says about a request means the request itself is wrong, and retrying cannot help.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import threading

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from core.errors import InferenceError, InferenceUnavailableError

_clients: dict[tuple[str, int], grpcclient.InferenceServerClient] = {}
_lock = threading.Lock()

#: gRPC status codes and Triton messages that mean "not now" rather than "never".
_UNAVAILABLE_MARKERS = (
    "StatusCode.UNAVAILABLE",
    "StatusCode.DEADLINE_EXCEEDED",
    "StatusCode.CANCELLED",
    "StatusCode.RESOURCE_EXHAUSTED",
    "failed to connect",
    "Socket closed",
    "Connection reset",
    "is not ready",
    "is not found",  # model unloaded during a restart or a version roll-out
    "unavailable",
    "Deadline Exceeded",
    "Stub process",  # python backend stub restarting
)


def get_client(url: str) -> grpcclient.InferenceServerClient:
    """This process's client for ``url`` (created lazily, after any fork)."""
    key = (url, os.getpid())
    with _lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = grpcclient.InferenceServerClient(url=url)
        return client


def reset_clients() -> None:
    """Forget clients (their channels belong to a parent process or a dead server)."""
    with _lock:
        _clients.clear()


@atexit.register
def _close_clients() -> None:
    """Close this process's channels while gRPC is still whole: left to the garbage collector at
    interpreter exit, a client's ``__del__`` runs after gRPC's module state is gone and prints a
    traceback."""
    with _lock:
        mine = [c for (_, pid), c in _clients.items() if pid == os.getpid()]
        _clients.clear()
    for client in mine:
        with contextlib.suppress(Exception):
            client.close()


def is_unavailable(exc: BaseException) -> bool:
    text = f"{getattr(exc, 'status', lambda: '')()} {exc}"
    return any(marker.lower() in text.lower() for marker in _UNAVAILABLE_MARKERS)


def infer(
    url: str,
    model: str,
    version: str,
    inputs: dict[str, np.ndarray],
    outputs: list[str],
    *,
    timeout_s: float,
    request_id: str = "",
) -> dict[str, np.ndarray]:
    """One synchronous inference; raises InferenceUnavailableError or InferenceError."""
    client = get_client(url)
    request = []
    for name, array in inputs.items():
        tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        request.append(tensor)
    try:
        result = client.infer(
            model,
            request,
            model_version=version,
            outputs=[grpcclient.InferRequestedOutput(o) for o in outputs],
            request_id=request_id,
            client_timeout=timeout_s,
        )
    except InferenceServerException as exc:
        if is_unavailable(exc):
            reset_clients()
            raise InferenceUnavailableError(
                f"Triton at {url} cannot serve {model} v{version} right now: {exc.message()}"
            ) from exc
        raise InferenceError(
            f"Triton refused the request to {model} v{version}: {exc.message()}"
        ) from exc
    return {name: result.as_numpy(name) for name in outputs}
