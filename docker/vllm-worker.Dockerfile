# A vLLM worker on one NVIDIA GPU: `das worker --backend vllm`, our worker app around vLLM's
# AsyncLLM, drafting through our speculation core inside vLLM (service/vllm_backend). Built on
# vLLM's official image at the tag of the version the backend is pinned to; the build fails if
# that image carries another vllm.
# vLLM's own pins conflict with this package's (fastapi < 0.137, transformers < 5.20 against
# our 0.165 and 5.23), so vLLM keeps the requirements it was built with and this package goes
# in with --no-deps, plus the few it needs that vLLM does not bring: the recipe of the
# Makefile's .venv-vllm, on vLLM's CUDA build instead of the CPU one.
# Build from the repository root: docker build -f docker/vllm-worker.Dockerfile .
# Run: docker run --gpus all --ipc=host -v /models:/models -p 8000:8000 IMAGE \
#   worker --backend vllm --model /models/M --host 0.0.0.0 --port 8000 [-- VLLM ENGINE FLAGS]
# Not built here (no Docker engine or GPU on the development machines).
FROM vllm/vllm-openai:v0.32.0
RUN python3 -c "import importlib.metadata as m; v = m.version('vllm'); assert v == '0.32.0', v"
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ cmake make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml CMakeLists.txt README.md ./
COPY drafter ./drafter
COPY service ./service
# vLLM's "suffix" method, which our proposer takes the place of, requires arctic-inference:
# built against the image's torch (no build isolation, no deps), as the Makefile does.
RUN python3 -m pip install --no-cache-dir cmake nanobind==2.9.2 wheel \
    && python3 -m pip install --no-cache-dir --no-build-isolation --no-deps arctic-inference==0.3.0 \
    && python3 -m pip install --no-cache-dir --no-deps . \
    && python3 -m pip install --no-cache-dir pydantic-settings==2.16.3 redis==8.1.0 \
    && python3 -c "import importlib.metadata as m, torch; \
assert m.version('vllm') == '0.32.0'; assert torch.version.cuda, torch.__version__; \
assert [e.value for e in m.entry_points(group='vllm.general_plugins') if e.name == 'das'] \
== ['service.vllm_backend.plugin:register']; import arctic_inference, service.vllm_backend.worker"
EXPOSE 8000
ENTRYPOINT ["das"]
CMD ["worker", "--backend", "vllm", "--host", "0.0.0.0", "--port", "8000", "--device", "cuda"]
