"""The state store: what was published, what was parked, and every run."""
