# The images of the reward service and of the trainer, from one file: EXTRAS picks what is installed.
#
#   docker build --build-arg EXTRAS=service -t online-dpo-service:latest .   # the reward service
#   docker build --build-arg EXTRAS=trainer -t online-dpo:latest .           # trainer + demo models
#   docker build -t online-dpo-all:latest .                                  # both (EXTRAS=all)
#   docker build --build-arg TORCH_VARIANT=cuda --build-arg EXTRAS=service -t online-dpo-service:cuda .
#
# docker-compose.yml builds the first two. BASE_IMAGE: any Debian-like image with python3 3.11 and
# venv. When it already has torch installed (system site-packages), torch is not installed again.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
# System site-packages stay visible so that a base image's torch is reused, not copied.
RUN python3 -m venv --system-site-packages /opt/venv
RUN if python -c "import torch" 2>/dev/null; then \
        python -c "import torch; print('torch', torch.__version__, 'from the base image')"; \
    elif [ "$TORCH_VARIANT" = cpu ]; then \
        pip install --index-url https://download.pytorch.org/whl/cpu "torch==$TORCH_VERSION"; \
    elif [ "$TORCH_VARIANT" = cuda ]; then \
        pip install "torch==$TORCH_VERSION"; \
    else \
        echo "TORCH_VARIANT must be 'cpu' or 'cuda', got '$TORCH_VARIANT'" >&2; exit 2; \
    fi
WORKDIR /src
# Declared after the torch layer, so that the images of every EXTRAS share it.
ARG EXTRAS=all
# Dependencies first: this layer is reused while only the sources change.
COPY pyproject.toml docker/requirements.py ./
RUN python requirements.py pyproject.toml "$EXTRAS" > requirements.txt \
    && pip install -r requirements.txt
COPY README.md ./
COPY common ./common
COPY reward_service ./reward_service
COPY trainer ./trainer
RUN pip install --no-deps . && rm -rf build *.egg-info

FROM ${BASE_IMAGE}
RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin app \
    && mkdir -p /models /outputs /config \
    && chown app:app /models /outputs /config
COPY --from=build /opt/venv /opt/venv
# Executable bits come from git (the legacy builder of docker-compose 1.29 has no COPY --chmod).
COPY docker/init-models.sh docker/serve.sh docker/train.sh /usr/local/bin/
COPY docker/trainer-demo.yaml /config/
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/home/app/.cache/huggingface
USER app
WORKDIR /home/app
EXPOSE 8000
CMD ["serve.sh"]
