# The proxy alone (no model, no torch): it fronts an OpenAI-compatible server given by env.
#   docker build -t sharpen .
#   docker run -p 8000:8000 -e SHARPEN_UPSTREAM__URL=http://vllm:8000/v1 \
#     -e SHARPEN_API_KEYS='{"sk-team-a": "team-a"}' sharpen
# A non-loopback bind needs API keys (or SHARPEN_INSECURE=true, for a private network only).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SHARPEN_HOST=0.0.0.0 \
    SHARPEN_PORT=8000 \
    SHARPEN_DATA_DIR=/data

WORKDIR /app
COPY pyproject.toml README.md ./
COPY protocol ./protocol
COPY server ./server
COPY strategies ./strategies
COPY memory ./memory
COPY adapt ./adapt
COPY evals ./evals
# bubblewrap for the code sandbox; it needs user namespaces (a container runtime's default seccomp
# profile may deny them: tools are then refused, never run unconfined)
RUN apt-get update && apt-get install -y --no-install-recommends bubblewrap \
    && rm -rf /var/lib/apt/lists/*
# Optional extras, e.g. --build-arg EXTRAS='[ray]' for training on a Ray cluster (deploy/).
ARG EXTRAS=""
RUN pip install --no-cache-dir ".${EXTRAS}" \
    && useradd --system --uid 10001 --home-dir /data --create-home sharpen

USER 10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)"]
ENTRYPOINT ["sharpen", "serve"]
