"""ffnskip: FFN-SkipLLM adaptive feed-forward skipping for faster LLM decoding.

Core library: models, skip policy, engine, decode loop, evaluation. Imports neither Ray nor the
``tuning`` / ``serve`` packages.
"""

from .adapters import SUPPORTED_MODEL_TYPES, UnsupportedArchitecture, get_adapter
from .decode import (
    DecodeSession,
    GenerationError,
    SamplingParams,
    SequenceResult,
    TokenEvent,
    decode_one_token,
    encode_prompt,
    generate,
    generate_text,
    prefill,
)
from .engine import SeqStats, SkipController, ffn_share
from .errors import FFNSkipError
from .eval import EvalReport, evaluate
from .policy import MODES, PolicyError, ResolvedPolicy, SkipPolicy, parse_policy

__version__ = "0.1.0"


def load_model(name_or_path: str = "smollm2-135m", dtype=None, device=None):
    """Load ``(model, tokenizer)`` from an alias, a HF directory / hub id, or a ``.gguf`` file."""
    from .loading import load_model as _load

    return _load(name_or_path, dtype=dtype, device=device)


__all__ = [
    "MODES",
    "DecodeSession",
    "EvalReport",
    "FFNSkipError",
    "GenerationError",
    "PolicyError",
    "ResolvedPolicy",
    "SamplingParams",
    "SeqStats",
    "SequenceResult",
    "SkipController",
    "SkipPolicy",
    "SUPPORTED_MODEL_TYPES",
    "TokenEvent",
    "UnsupportedArchitecture",
    "decode_one_token",
    "encode_prompt",
    "evaluate",
    "ffn_share",
    "generate",
    "generate_text",
    "get_adapter",
    "load_model",
    "parse_policy",
    "prefill",
]

