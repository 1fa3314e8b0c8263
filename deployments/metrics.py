"""Prometheus metrics of the API (served at /metrics by the ingress)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

REGISTRY = CollectorRegistry()
REQUESTS = Counter("faceid_requests_total", "API requests", ["route", "status"], registry=REGISTRY)
LATENCY = Histogram("faceid_request_seconds", "API latency", ["route"], registry=REGISTRY,
                    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120))
BATCH_SIZE = Histogram("faceid_batch_size", "Requests per executed batch", ["deployment"], registry=REGISTRY,
                       buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32))
CACHE = Counter("faceid_identity_cache_total", "Generator identity cache lookups", ["result"], registry=REGISTRY)
IDENTITY_SCORE = Histogram("faceid_identity_score", "Similarity of generated faces to the enrolled identity",
                           registry=REGISTRY, buckets=(-0.2, 0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0))
