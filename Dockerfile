# loraserve on a CUDA host. The model and adapter store are volumes, never baked in:
#   docker build -t loraserve .
#   docker run --gpus all -p 50051:50051 -p 8000:8000 -v /models/base:/models/base:ro \
#       -v /models/adapters:/models/adapters:ro loraserve
# No CUDA base image and no apt: torch's Linux wheel brings the CUDA runtime libraries as pip
# packages (nvidia-*), and `--gpus all` (NVIDIA Container Toolkit) mounts the host's driver.
FROM python:3.11-slim-bookworm

RUN groupadd --gid 10001 loraserve && useradd --create-home --uid 10001 --gid 10001 loraserve
WORKDIR /app
COPY pyproject.toml README.md ./
COPY pyclient pyclient
COPY server server
COPY scheduler scheduler
COPY runner runner
COPY registry registry
COPY tools tools
# loraserve carries the contract and the clients (pyclient/): one install.
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir .
ENV PATH=/opt/venv/bin:$PATH \
    LORASERVE_HOST=0.0.0.0 \
    LORASERVE_MODEL_PATH=/models/base \
    LORASERVE_ADAPTERS_DIR=/models/adapters \
    HF_HUB_OFFLINE=1
USER 10001:10001
EXPOSE 50051 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s CMD ["python3", "-c", "import grpc, sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; sys.exit(g.HealthStub(grpc.insecure_channel('localhost:50051')).Check(h.HealthCheckRequest(), timeout=3).status != 1)"]
ENTRYPOINT ["loraserve", "serve"]
