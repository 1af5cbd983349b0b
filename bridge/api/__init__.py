"""The resolver API: FastAPI app, routes, and the only place bridge errors become HTTP answers."""
