# The gateway: routes trainer requests to workers by prompt group. No torch, no GPU.
# Build from the repository root: docker build -f docker/gateway.Dockerfile .
# Not built here (no Docker engine on the development machines).
FROM python:3.11.13-slim-bookworm
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ cmake make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml CMakeLists.txt README.md ./
COPY drafter ./drafter
COPY service ./service
# The package with the pins of pyproject.toml (the native suffix tree is compiled here).
RUN pip install --no-cache-dir .
EXPOSE 8000
ENTRYPOINT ["das"]
CMD ["gateway", "--host", "0.0.0.0", "--port", "8000"]
