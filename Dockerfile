# model-sidecar: slim Python base, non-root, healthcheck on the admin listener's /healthz.
FROM python:3.11-slim

RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin sidecar \
 && mkdir -p /etc/sidecar /var/lib/sidecar && chown sidecar /var/lib/sidecar

WORKDIR /src
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
RUN pip install --no-cache-dir . && rm -rf /src

COPY config/example.yaml /etc/sidecar/config.yaml
USER sidecar
WORKDIR /var/lib/sidecar
ENV SIDECAR_CONFIG=/etc/sidecar/config.yaml PYTHONUNBUFFERED=1
EXPOSE 8080 9901

# liveness only: /healthz never depends on a backend (docs/reference/admin-api.md#readiness-and-liveness)
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9901/healthz', timeout=2)"]

STOPSIGNAL SIGTERM
ENTRYPOINT ["sidecar", "run"]
