# CPU image for docker-compose.yml (server, sampler, trainer, eval all run from it).
# GPU serving uses the official vllm/vllm-openai image instead (compose profile `gpu`).
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends redis-tools && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY . /app
RUN pip install --no-cache-dir -e ".[cpu]" && flywheel models --help >/dev/null
ENV FLYWHEEL_HOME=/data/flywheel HF_HUB_OFFLINE=1
