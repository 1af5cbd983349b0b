"""How the series of a page of studies are asked of the archive (BRIDGE_DICOMWEB_SERIES_QUERY).

Defined with the settings that choose it (bridge/config/choices.py), which sit below the archive client.
"""

from __future__ import annotations

from bridge.config.choices import SeriesQuery as SeriesQuery
