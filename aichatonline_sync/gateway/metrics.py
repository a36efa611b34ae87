"""The gateway's Prometheus metrics, with prometheus-client (the ``gateway`` extra).

One set of metrics per process, on a registry of its own (never prometheus-client's global
``REGISTRY``, which the application may use for its own metrics):

- ``aichatonline_gateway_requests_total{path, status}``: every request answered, by route
  (``/v1/models/{model}`` for any model, ``other`` for unknown paths) and HTTP status;
- ``aichatonline_gateway_active_streams``: streamed replies in progress;
- ``aichatonline_gateway_time_to_first_byte_seconds{path}``: from the request to its first body
  byte (for a stream, the first chunk, sent once the upstream's first piece arrived);
- ``aichatonline_gateway_upstream_retries_total``: retries of the upstream's requests, one per
  ``retry`` event of the session (a failed token fetch and a failed chat request alike), for the
  session the app makes and for a session made with ``event_hooks=metrics_hooks()``;
- ``aichatonline_gateway_upstream_errors_total{type}``: upstream failures answered to a client
  (``rate_limit_error``, ``upstream_error``, ``timeout_error``), before or after the first chunk.

Under a server with several worker processes (gunicorn ``--workers``), set
``PROMETHEUS_MULTIPROC_DIR`` to an empty directory, writable by the workers, before the server
starts: prometheus-client then keeps each process's values in files there, and ``/metrics`` sums
them across the workers (the active-streams gauge counts live processes only).

Without prometheus-client, :attr:`Metrics.available` is ``False``, every method does nothing, and
:meth:`Metrics.render` returns ``None``.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Callable, Optional

from .._wire.errors import InvalidRequestError

if TYPE_CHECKING:
    from .. import ChatEvent

__all__ = ["MULTIPROC_ENV", "PATHS", "Metrics", "metrics", "metrics_hooks"]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
PREFIX = "aichatonline_gateway"
#: The values of the ``path`` label.
PATHS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v1/models",
    "/v1/models/{model}",
    "/health",
    "/metrics",
    "other",
)
_TTFB_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """The metrics of this process (see the module's docstring); threads may share it."""

    def __init__(self) -> None:
        try:
            import prometheus_client
        except ImportError:
            self.available = False
            return
        folder = os.environ.get(MULTIPROC_ENV)
        if folder and not (os.path.isdir(folder) and os.access(folder, os.W_OK | os.X_OK)):
            # Said at boot: prometheus-client would fail at its first file there, with a bare
            # OSError.
            raise InvalidRequestError(
                f"${MULTIPROC_ENV}={folder!r} is not a folder the gateway can write: make it "
                "(empty) before the server starts, or unset it for a single process"
            )
        self.available = True
        self._client = prometheus_client
        self.registry = prometheus_client.CollectorRegistry()
        registry = self.registry
        self.requests = prometheus_client.Counter(
            f"{PREFIX}_requests",
            "Requests answered by the gateway, by route and HTTP status.",
            ["path", "status"],
            registry=registry,
        )
        self.active_streams = prometheus_client.Gauge(
            f"{PREFIX}_active_streams",
            "Streamed replies in progress.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.time_to_first_byte = prometheus_client.Histogram(
            f"{PREFIX}_time_to_first_byte_seconds",
            "Seconds from a request to the first byte of its body.",
            ["path"],
            buckets=_TTFB_BUCKETS,
            registry=registry,
        )
        self.upstream_retries = prometheus_client.Counter(
            f"{PREFIX}_upstream_retries",
            "Retries of requests to the upstream service.",
            registry=registry,
        )
        self.upstream_errors = prometheus_client.Counter(
            f"{PREFIX}_upstream_errors",
            "Upstream failures answered to a client, by OpenAI error type.",
            ["type"],
            registry=registry,
        )

    def request(self, path: str, status: int) -> None:
        if self.available:
            self.requests.labels(path, str(status)).inc()

    def first_byte(self, path: str, seconds: float) -> None:
        if self.available:
            self.time_to_first_byte.labels(path).observe(seconds)

    def stream_started(self) -> None:
        if self.available:
            self.active_streams.inc()

    def stream_ended(self) -> None:
        if self.available:
            self.active_streams.dec()

    def upstream_retry(self) -> None:
        if self.available:
            self.upstream_retries.inc()

    def upstream_error(self, kind: str) -> None:
        if self.available:
            self.upstream_errors.labels(kind).inc()

    def render(self) -> Optional[tuple[str, bytes]]:
        """``(content type, body)`` of the text format, summed over the worker processes when
        ``$PROMETHEUS_MULTIPROC_DIR`` is set; ``None`` without prometheus-client."""
        if not self.available:
            return None
        client = self._client
        registry = self.registry
        if os.environ.get(MULTIPROC_ENV):
            from prometheus_client import multiprocess

            registry = client.CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return client.CONTENT_TYPE_LATEST, client.generate_latest(registry)


_lock = threading.Lock()
_metrics: Optional[Metrics] = None


def metrics() -> Metrics:
    """This process's metrics, made at the first call (prometheus-client is imported then)."""
    global _metrics
    if _metrics is None:
        with _lock:
            if _metrics is None:
                _metrics = Metrics()
    return _metrics


def _count_retry(event: ChatEvent) -> None:
    metrics().upstream_retry()


def metrics_hooks() -> dict[str, list[Callable[[ChatEvent], object]]]:
    """The event hooks that feed the gateway's metrics, for a session given to ``make_app``.

    The app counts the retries of the session it makes itself; a session it is given is counted
    only when it was made with these hooks (a session's hooks are fixed when it is made)::

        session = Session(event_hooks=metrics_hooks())
        app = make_app(session)

    Each call returns a new dict of new lists: add hooks of your own to them freely.
    """
    return {"retry": [_count_retry]}
