# The router's image: `docker build -t extproc .` (docker-compose.yml builds it too). It also runs
# the simulated vLLM engine (`extproc serve-engine`) for the compose file's CPU profile.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY extproc ./extproc
# A fixed numeric uid: Kubernetes' runAsNonRoot can only verify a numeric USER.
RUN pip install . \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin extproc \
 && install -d -o 10001 -g 10001 /var/lib/extproc
# The built-in families' tokenizer files (pinned by SHA-256), for exact counts near a pool's limit:
# fetched at build time so that the router needs no network at run time. (XDG_CACHE_HOME, not
# EXTPROC_TOKENIZER_CACHE: every EXTPROC_* variable is read as a config field.)
ENV XDG_CACHE_HOME=/opt/cache
RUN python -c "from extproc.tokens.files import BUILTIN, family_dir; [family_dir(f) for f in BUILTIN]" \
 && chmod -R a+rX /opt/cache

# The built-in config; mount another over it (compose, a Kubernetes ConfigMap) or override single
# fields with EXTPROC_<SECTION>__<FIELD> variables.
COPY config/router.yaml /etc/extproc/router.yaml
# Inside a container the router must listen beyond loopback; calibration goes to a volume.
ENV EXTPROC_SERVICE__GRPC_ADDRESS=0.0.0.0:50051 \
    EXTPROC_SERVICE__HTTP_ADDRESS=0.0.0.0:50052 \
    EXTPROC_SERVICE__METRICS_ADDRESS=0.0.0.0:9464 \
    EXTPROC_SERVICE__SNAPSHOT_PATH=/var/lib/extproc/calibration.json
VOLUME /var/lib/extproc

USER 10001
# 50051 gRPC (ext_proc, access-log ends, grpc.health.v1), 50052 ext_authz checks, 9464 /metrics
EXPOSE 50051 50052 9464
# grpc.health.v1 from inside the container: the check Envoy and Kubernetes make
HEALTHCHECK --interval=5s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-m", "extproc.service.healthcheck"]
CMD ["extproc", "serve", "--config", "/etc/extproc/router.yaml"]
