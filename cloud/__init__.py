"""Cloud companion: ingest, patch store, metrics, fleet dashboard (and, later, MoMoDistill and publishing)."""
