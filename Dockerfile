# syntax=docker/dockerfile:1
# Build: make sbom && docker build -t resilience-proxy:0.1.0 .   (the SBOM of requirements.lock ships in the image)
# Base pinned by exact tag (add @sha256:<digest> from your registry mirror); dependencies from a hash-pinned lock.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY requirements.lock ./
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --require-hashes --no-deps -r requirements.lock
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY config ./config
RUN /opt/venv/bin/pip install --no-deps --no-build-isolation . \
 && find /opt/venv -name '__pycache__' -prune -exec rm -rf {} +

FROM ${PYTHON_IMAGE} AS final
# No compilers here: only the virtualenv built above. A numeric, non-root user; works with a read-only
# root filesystem (nothing is written outside /tmp, mounted as an emptyDir in the manifests).
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PROXY_CONFIG=/etc/resilience-proxy/config.yaml
COPY --from=build /opt/venv /opt/venv
COPY sbom.cdx.json /usr/share/doc/resilience-proxy/sbom.cdx.json
USER 10001:10001
EXPOSE 9901
ENTRYPOINT ["resilience-proxy"]
CMD ["run"]
