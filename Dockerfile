# syntax=docker/dockerfile:1
#
# Two images of the two-tower system from one file:
#   serve (default, last stage)   the retrieval API: numpy + FAISS + FastAPI, no torch, pandas or
#                                 pyarrow (the request path and version loading need none of them)
#   train (--target train)        everything: `trainer fit|evaluate|export ...`, `indexer rebuild ...`
# Data, model bundles and index versions live on volumes (/data, /models, /index), never in an image.
#
# Build the API (CPU):    docker build -t twotower:0.1.0 .
# Build the jobs image:   docker build --target train -t twotower-train:0.1.0 .
# ... for CUDA:           docker build --target train --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t twotower-train:0.1.0-cu128 .
#
# The base is pinned to an exact patch release; bump it deliberately (every stage must share it,
# because the virtualenvs copied from the builders point at the base's interpreter).
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# ---------------------------------------------------------------------------------------------
# builder: the serving virtualenv (pyproject's base dependencies + the project). Compilers and
# pip caches stay here; only /opt/venv is copied out.
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# A compiler for any dependency that has no wheel for this platform (none today on amd64/arm64,
# but an sdist fallback must not break the build). It never reaches a final image.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src

# Dependencies first, from the project's own metadata, so source edits do not reinstall them.
COPY pyproject.toml ./
COPY docker/pyproject_deps.py /tmp/pyproject_deps.py
RUN python /tmp/pyproject_deps.py pyproject.toml > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt

# Then the project itself (a regular, non-editable install into the venv), checked to serve
# without torch, pandas or pyarrow.
COPY README.md ./
COPY training ./training
COPY indexer ./indexer
COPY service ./service
RUN pip install --no-deps . \
 && pip check \
 && python -c "import importlib.util as u, sys; bad = [m for m in ('torch', 'pandas', 'pyarrow') if u.find_spec(m)]; sys.exit(f'serving venv has {bad}' if bad else 0)" \
 && python -c "import service.app"

# ---------------------------------------------------------------------------------------------
# train-builder: the serving venv plus the `train` extra (torch, pandas, pyarrow, onnx, ...).
FROM builder AS train-builder

# PyTorch wheel index. The CPU index keeps the image ~1 GB smaller than CUDA's libraries.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# Only the torch wheel comes from TORCH_INDEX_URL (at the version pyproject pins; 2.13.0+cpu
# satisfies ==2.13.0); everything else, torch's own dependencies included, from PyPI.
RUN python /tmp/pyproject_deps.py pyproject.toml --extra train --only torch > /tmp/torch-requirements.txt \
 && python /tmp/pyproject_deps.py pyproject.toml --extra train > /tmp/train-requirements.txt \
 && pip install --no-deps --index-url "${TORCH_INDEX_URL}" -r /tmp/torch-requirements.txt \
 && pip install -r /tmp/train-requirements.txt \
 && pip check \
 && trainer --help > /dev/null \
 && indexer --help > /dev/null

# ---------------------------------------------------------------------------------------------
# runtime: what both images share. Same base, no compiler, no source tree, no pip cache, non-root.
FROM ${PYTHON_IMAGE} AS runtime

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SERVICE_INDEX_ROOT=/index

# libgomp1: OpenMP runtime used by FAISS and PyTorch CPU kernels. apt's package caches go too
# (/var/cache/apt/*.bin: ~75 MB on a base without the official images' docker-clean apt config).
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
 && groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --home-dir /home/app --create-home --shell /usr/sbin/nologin app \
 && mkdir -p /data /models /index \
 && chown app:app /data /models /index

COPY docker/healthcheck.py /app/docker/healthcheck.py

WORKDIR /app
# Numeric so that orchestrators (Kubernetes runAsNonRoot) can verify it without /etc/passwd.
USER 10001:10001

# Named volumes are initialised from these (empty, app-owned) directories.
VOLUME ["/data", "/models", "/index"]
EXPOSE 8000

# Ready, not just alive: 200 only while a complete model and index are loaded.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "/app/docker/healthcheck.py"]

CMD ["python", "-m", "service.run", "--host", "0.0.0.0", "--port", "8000"]

# ---------------------------------------------------------------------------------------------
# train: the jobs image (compose's bootstrap and nightly); it can serve too.
FROM runtime AS train
COPY --from=train-builder /opt/venv /opt/venv
USER 10001:10001

# ---------------------------------------------------------------------------------------------
# serve: the API image, the default target (compose's api).
FROM runtime AS serve
COPY --from=builder /opt/venv /opt/venv
USER 10001:10001
