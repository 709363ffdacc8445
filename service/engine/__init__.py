"""The embedded torch engine: model loading, our own Llama-family runner with a per-slot KV
cache, counter-based sampling, and continuous batching with lossless speculation."""

from service.engine.config import EngineConfig
from service.engine.engine import Engine, EngineStats, RequestOutput
from service.engine.models import load_model
from service.engine.runner import Runner

__all__ = ["Engine", "EngineConfig", "EngineStats", "RequestOutput", "Runner", "load_model"]
