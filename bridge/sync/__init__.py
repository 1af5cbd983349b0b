"""The sync worker: discover studies, fetch series, map, publish, record."""
