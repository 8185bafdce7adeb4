"""Inference for what kubetune trains: loading, generation, streaming, speculative decoding,
batch generation over datasets, the OpenAI-compatible server (`kubetune serve`) and `kubetune chat`.

Heavy modules (torch, transformers, FastAPI) are imported lazily by the functions that need them.
"""

from kubetune.trainer.serve.engine import ENGINES, Engine, UnknownModel, pick_engine
from kubetune.trainer.serve.engines import create_engine
from kubetune.trainer.serve.params import (
    Completion,
    Event,
    InvalidRequest,
    SamplingParams,
    Sequence,
    TokenLogprob,
)

__all__ = [
    "ENGINES",
    "Completion",
    "Engine",
    "Event",
    "InvalidRequest",
    "SamplingParams",
    "Sequence",
    "TokenLogprob",
    "UnknownModel",
    "create_engine",
    "pick_engine",
]
