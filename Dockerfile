# model-sidecar's image: two stages, non-root, a HEALTHCHECK on the admin listener's /readyz.
#   docker build -t model-sidecar:0.1.0 .
#   docker run --rm --network host -v $PWD/examples/configs:/etc/sidecar:ro model-sidecar:0.1.0 -c /etc/sidecar/tf-serving.yaml
# No container engine runs in CI; tests/test_examples.py lints this file with hadolint.
# docs/deployment.md#container

# --- build: the package and its dependencies into a virtualenv (wheels only, no compiler) ---
FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/sidecar
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
RUN /opt/sidecar/bin/pip install --only-binary=:all: --no-compile . \
 && /opt/sidecar/bin/python -m compileall -q /opt/sidecar/lib

# --- run: the virtualenv alone, on the same slim base, as uid 10001 ---
FROM python:3.11-slim-bookworm
RUN useradd --system --uid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin sidecar \
 && mkdir -p /etc/sidecar /var/lib/sidecar && chown 10001 /var/lib/sidecar
COPY --from=build /opt/sidecar /opt/sidecar
COPY config/example.yaml /etc/sidecar/config.yaml
ENV PATH=/opt/sidecar/bin:$PATH \
    SIDECAR_CONFIG=/etc/sidecar/config.yaml \
    SIDECAR_HEALTHCHECK_URL=http://127.0.0.1:9901/readyz \
    PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# numeric, so that Kubernetes' runAsNonRoot can check it
USER 10001
WORKDIR /var/lib/sidecar
EXPOSE 8080 9901

# healthy = ready: 200 once the config is loaded and the listeners are up, 503 while draining.
# Neither /readyz nor /healthz depends on a model's health. A config whose admin.listen is not
# on port 9901 sets SIDECAR_HEALTHCHECK_URL (docs/reference/admin-api.md#readiness-and-liveness).
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['SIDECAR_HEALTHCHECK_URL'], timeout=2)"]

STOPSIGNAL SIGTERM
ENTRYPOINT ["sidecar", "run"]
