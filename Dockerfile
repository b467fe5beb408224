# The cifar10-cnn service on the CPU: CPU-only torch, ONNX Runtime (the CPU default backend: the
# model is exported to it in memory at startup), no torchvision, the shipped weights inside.
#
#   docker build -t cifar10-cnn .
#   docker run --rm -p 8000:8000 cifar10-cnn
#
# Build arguments:
#   BASE_IMAGE      Python 3.11+ image for both stages (default python:3.11-slim).
#   TORCH_PIP_ARGS  where torch comes from (default: PyTorch's CPU wheel index, about 190 MB
#                   instead of the multi-GB CUDA build). A local wheel directory or server:
#                   --build-arg TORCH_PIP_ARGS=--find-links=http://host:port/
#   TORCH_SPEC      the torch requirement (default torch>=2.5). Pin it when TORCH_PIP_ARGS only
#                   adds wheels to PyPI (--find-links), or pip takes PyPI's newer CUDA build:
#                   --build-arg TORCH_SPEC=torch==2.13.0+cpu
#   EXTRA_PIP_ARGS  added to every pip install (a mirror, --trusted-host, ...).
#
# CUDA variant: the same Dockerfile with a CUDA wheel index; those wheels bring their CUDA
# libraries as pip packages, so the slim base stays, and the host needs the NVIDIA Container
# Toolkit (the image is then several GB):
#   docker build -t cifar10-cnn:cuda \
#       --build-arg TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cu128" .
#   docker run --rm --gpus all -p 8000:8000 -e CIFAR10_DEVICE=cuda cifar10-cnn:cuda
#
# Other weights: mount them and point CIFAR10_WEIGHTS at the file, e.g.
#   docker run --rm -p 8000:8000 -v "$PWD/weights:/models:ro" \
#       -e CIFAR10_WEIGHTS=/models/final_model.pt cifar10-cnn
# The port is UVICORN_PORT (default 8000); the HEALTHCHECK follows it. Any CIFAR10_* setting
# can be given with -e.

ARG BASE_IMAGE=python:3.11-slim

# ---- builder: a virtual environment with the runtime dependencies ------------------------------
FROM ${BASE_IMAGE} AS builder

ARG TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
ARG TORCH_SPEC="torch>=2.5"
ARG EXTRA_PIP_ARGS=""

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, on its own, from TORCH_PIP_ARGS; its own dependencies come from PyPI.
# TORCH_PIP_ARGS and EXTRA_PIP_ARGS are left unquoted on purpose: each may hold several words.
RUN pip install $EXTRA_PIP_ARGS $TORCH_PIP_ARGS "$TORCH_SPEC" \
    && pip freeze | grep -i '^torch==' > /tmp/torch-pin.txt \
    && cat /tmp/torch-pin.txt

# The rest of [project] dependencies from pyproject.toml (the one list of them), with torch held
# at the build just installed so no resolution can swap it for another build.
COPY pyproject.toml /tmp/pyproject.toml
RUN python -c "import tomllib; print(*tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
        > /tmp/requirements.txt \
    && pip install $EXTRA_PIP_ARGS -c /tmp/torch-pin.txt -r /tmp/requirements.txt \
    && pip check

# Trim what inference never loads (about 150 MB): torch's C++ headers and static libraries (for
# building extensions), its C++ test executables, protoc; then pip and setuptools themselves.
RUN torch_dir=$(python -c "import importlib.util; print(importlib.util.find_spec('torch').submodule_search_locations[0])") \
    && rm -rf "$torch_dir/include" "$torch_dir/test" \
    && find "$torch_dir/lib" -name '*.a' -delete \
    && find "$torch_dir/bin" -mindepth 1 -maxdepth 1 ! -name torch_shm_manager -exec rm -rf {} + \
    && python -m pip uninstall --yes pip setuptools \
    && python -c "import torch; print('torch', torch.__version__, torch.zeros(2, 3).sum().item())"

# The code and the shipped weights (FinalModel; LiteModel and AirbenchNet served as models "lite"
# and "best"), readable by
# every user whatever modes the checkout has (training writes its checkpoints owner-only); root
# owns them, so the server cannot change them.
COPY app/ /src/app/
COPY weights/final_model.pt weights/lite_model.pt weights/best_model.pt /src/weights/
RUN chmod -R a+rX,go-w /src

# ---- runtime ------------------------------------------------------------------------------------
FROM ${BASE_IMAGE}

# A fixed numeric uid, so Kubernetes' runAsNonRoot can check it without a passwd lookup.
ARG APP_UID=10001
RUN groupadd --system --gid ${APP_UID} app \
    && useradd --system --uid ${APP_UID} --gid app --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin app

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    # The service sets its backend's thread count itself (CIFAR10_WORKERS, CIFAR10_TORCH_THREADS);
    # this only stops OpenMP/MKL from starting one thread per host core before it does.
    OMP_NUM_THREADS=1 \
    MKL_NUM_THREADS=1 \
    UVICORN_HOST=0.0.0.0 \
    UVICORN_PORT=8000 \
    # Finish in-flight requests after SIGTERM, within Docker's and Kubernetes' grace periods.
    UVICORN_TIMEOUT_GRACEFUL_SHUTDOWN=20 \
    # The protocol with the connection cap, slow-client deadlines and admission gate
    # (app/connections.py), and a listen backlog as deep as the connection cap.
    UVICORN_HTTP=app.connections:GuardedHTTPProtocol \
    UVICORN_BACKLOG=2048 \
    CIFAR10_WEIGHTS=/app/weights/final_model.pt \
    CIFAR10_LITE_WEIGHTS=/app/weights/lite_model.pt \
    CIFAR10_BEST_WEIGHTS=/app/weights/best_model.pt \
    CIFAR10_DEVICE=auto

COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /src/ /app/
WORKDIR /app

USER ${APP_UID}:${APP_UID}
EXPOSE 8000

# Healthy once the model is loaded and warmed up (GET /health/ready answers 200, not 503).
HEALTHCHECK --interval=5s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health/ready' % os.environ.get('UVICORN_PORT', '8000'), timeout=2)"]

# Exec form: uvicorn is PID 1 and gets SIGTERM itself. Host and port come from UVICORN_HOST
# and UVICORN_PORT, so a different port is one -e away and the HEALTHCHECK sees it too.
CMD ["uvicorn", "app.main:app"]
