"""Prometheus metrics of the workers, exposed by each worker's main process.

Celery's prefork pool runs tasks in child processes, so the metrics use prometheus-client's
multiprocess mode: children write to files under ``PROMETHEUS_MULTIPROC_DIR`` (set by whoever
starts the worker, before Python starts) and the main process serves their sum on
``MEDBATCH_METRICS_PORT``. Labels never carry identifiers, only job kinds and outcomes.
"""

from __future__ import annotations

import logging
import os

from celery.signals import worker_init
from prometheus_client import CollectorRegistry, Counter, Histogram, multiprocess, start_http_server

from core.settings import get_settings

log = logging.getLogger(__name__)

CHUNKS = Counter("medbatch_chunks_total", "Chunk tasks finished, by outcome.", ["kind", "outcome"])
ITEMS = Counter("medbatch_items_scored_total", "Items (molecules) scored and stored.", ["kind"])
TRITON_SECONDS = Histogram(
    "medbatch_triton_request_seconds",
    "Duration of one Triton inference request.",
    ["model"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
TRITON_UNAVAILABLE = Counter(
    "medbatch_triton_unavailable_total",
    "Inference attempts that found Triton unavailable.",
    ["model"],
)


@worker_init.connect
def _serve_metrics(**_: object) -> None:
    """In the worker's main process: serve the pool children's metrics on the metrics port."""
    port = get_settings().metrics_port
    if not port:
        return
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.MultiProcessCollector(registry)
    else:  # solo pool: the metrics live in this process
        from prometheus_client import REGISTRY

        registry = REGISTRY
    host = get_settings().metrics_host
    try:
        start_http_server(port, addr=host, registry=registry)
    except OSError as exc:  # a taken port must not stop the worker from working
        log.error("cannot serve metrics on %s:%s (%s); set MEDBATCH_METRICS_PORT", host, port, exc)
        return
    log.info("metrics on %s:%s/metrics", host, port)
