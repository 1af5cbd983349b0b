"""One module per group of routes, each with an ``APIRouter`` named ``router``."""
