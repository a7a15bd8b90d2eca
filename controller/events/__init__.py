"""Event ingest and the central log store.

``pipeline.EventPipeline`` is what the controller runs: sensors' batches pass their
quotas (``quota``) and go through ``writer.BatchWriter`` into an ``store.EventStore``
(``sqlite_store`` by default, ``postgres_store`` for a shared store; both read through
the one query layer in ``query`` over their dialects), then to the sinks (``sinks``: a
Cowrie JSON lines file) and live watchers (``broadcast``). ``ingest_service`` and
``query_service`` are the gRPC faces; ``metrics`` the Prometheus ones.
"""

from controller.events.pipeline import EventPipeline

__all__ = ["EventPipeline"]
