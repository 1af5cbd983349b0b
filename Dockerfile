# syntax=docker/dockerfile:1
# The bridge's image: API (default command), worker (`worker`) or both (`run`). Non-root, and fine
# with a read-only root filesystem: state goes to /var/lib/bridge (SQLite) or PostgreSQL.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY bridge ./bridge
RUN python -m venv /opt/bridge \
    && /opt/bridge/bin/pip install --no-cache-dir . \
    && /opt/bridge/bin/pip uninstall --yes pip

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="fhir-dicomweb-bridge" \
      org.opencontainers.image.description="Publishes DICOMweb studies as FHIR R4 ImagingStudy resources" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 bridge \
    && useradd --system --uid 10001 --gid bridge --home-dir /var/lib/bridge --shell /usr/sbin/nologin bridge \
    && mkdir -p /var/lib/bridge \
    && chown bridge:bridge /var/lib/bridge
COPY --from=build /opt/bridge /opt/bridge
COPY mappings /opt/bridge/share/mappings
COPY docker/healthcheck.py /opt/bridge/bin/healthcheck.py
ENV PATH=/opt/bridge/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    BRIDGE_MAPPINGS_DIR=/opt/bridge/share/mappings \
    BRIDGE_STATE_URL=sqlite:////var/lib/bridge/state.db
USER 10001:10001
WORKDIR /var/lib/bridge
VOLUME ["/var/lib/bridge"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "/opt/bridge/bin/healthcheck.py"]
ENTRYPOINT ["bridge"]
# Listening on every address, `bridge serve` refuses to start (exit 2) until API authentication is
# configured (BRIDGE_API_KEYS, BRIDGE_JWT_JWKS_URL or BRIDGE_JWT_PUBLIC_KEY), or
# BRIDGE_API_ALLOW_ANONYMOUS=true says a proxy in front authenticates callers. Not set here on purpose.
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
