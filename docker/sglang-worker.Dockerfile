# An SGLang worker on NVIDIA GPUs: SGLang's own server, with DAS drafts through its NGRAM
# verify path (service/sglang_plugin). Built on SGLang's official image at the tag of the
# version our plugin is pinned to; the build fails if that image carries another sglang.
# Build from the repository root: docker build -f docker/sglang-worker.Dockerfile .
# Run: docker run --gpus all --ipc=host -v /models:/models -p 8000:8000 IMAGE \
#   worker --backend sglang --model /models/M --cost-model h100-7b --host 0.0.0.0 --port 8000
# Not built here (no Docker engine or GPU on the development machines).
FROM lmsysorg/sglang:v0.5.23
RUN python3 -c "import importlib.metadata as m; v = m.version('sglang'); assert v == '0.5.23', v"
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ cmake make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml CMakeLists.txt README.md ./
COPY drafter ./drafter
COPY service ./service
# Our package without its pins (the image's sglang, torch, fastapi and numpy stay as SGLang
# built them), plus the two it needs that SGLang does not bring.
RUN pip install --no-cache-dir --no-deps . \
    && pip install --no-cache-dir pydantic-settings==2.16.3 redis==8.1.0 \
    && python3 -c "import importlib.metadata as m; \
assert [e.value for e in m.entry_points(group='sglang.srt.plugins') if e.name == 'das'] \
== ['service.sglang_plugin:register']; import service.sglang_plugin.worker"
EXPOSE 8000
ENTRYPOINT ["das"]
CMD ["worker", "--backend", "sglang", "--host", "0.0.0.0", "--port", "8000"]
