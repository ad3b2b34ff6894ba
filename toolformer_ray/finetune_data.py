"""Fine-tuning data: the augmented corpus C* -> packed token rows with a loss mask, plus a dev split.

Pure functions (no Ray, no torch): read the generate job's documents table, split off a dev set by a hash
of `doc_id` (stable across runs and seeds), pick the training texts, tokenize, pack, and map every optimizer
step to the rows it trains on. The order is a function of (seed, step) alone, so a resumed run sees exactly
the rows the interrupted one would have seen.

Training texts (section 4.1 of the paper): the augmented text of every training document that has at least
one kept call, plus `original_text_ratio` x that many original (call-free) texts, documents without calls
first. Dev texts: the ORIGINAL text of the dev documents (the checkpoint criterion is perplexity on text
without calls).

Packing: each text becomes [BOS if the tokenizer adds one] + tokens + [EOS]; texts are concatenated and cut
into rows of `max_length` tokens (the last row padded), as in GPT-style pre-training. `loss_mask[r, t]` is 1
when token t of row r is a loss target; column 0 never is (it has no predecessor in its row).
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from toolformer_ray.api_text import Markers, find_calls
from toolformer_ray.errors import UserError

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("doc_id", "text", "augmented_text")


class FinetuneDataError(UserError, ValueError):
    """The fine-tuning input cannot be used (missing table, wrong columns, nothing to train on)."""


# ------------------------------------------------------------------------------------------------ reading

def _visible(path: str, root: str) -> bool:
    rel = path[len(root):].lstrip("/")
    return not any(part.startswith((".", "_")) for part in rel.split("/"))


def find_document_tables(uri: str, storage_options: dict | None = None) -> tuple[str, list[str]]:
    """Where the documents table under `uri` is: ("committed", [version dir]) for a generate output
    version (read through its commit records), or ("files", [parquet files]) for plain Parquet.

    `uri` may be a generate output version (<run.output>/<config hash>), an output root holding exactly one
    version, a directory with a `documents/` folder (searched recursively) or of Parquet files, or one file.
    """
    fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    root = root.rstrip("/")
    if fs.isfile(root):
        return "files", [root]
    if not fs.isdir(root):
        raise FinetuneDataError(f"fine-tuning data not found: {uri}")
    if fs.isdir(f"{root}/_committed"):
        return "committed", [root]
    versions = sorted(p.rstrip("/").rsplit("/", 1)[0] for p in fs.glob(f"{root}/*/_committed"))
    if len(versions) == 1:
        return "committed", versions
    if len(versions) > 1:
        names = ", ".join(v.rsplit("/", 1)[-1] for v in versions)
        raise FinetuneDataError(f"{uri} holds {len(versions)} output versions ({names}); set finetune.data to one "
                                f"of them, e.g. {uri.rstrip('/')}/{versions[0].rsplit('/', 1)[-1]}")
    files = sorted(p for p in fs.glob(f"{root}/**/documents/*.parquet") if _visible(p, root))
    if not files:
        files = sorted(p for p in fs.glob(f"{root}/**/*.parquet") if _visible(p, root))
    if not files:
        raise FinetuneDataError(f"no documents table (*.parquet) under {uri}")
    return "files", files


def read_documents(uri: str, storage_options: dict | None = None) -> pa.Table:
    """The documents table (doc_id, text, augmented_text), duplicates of a doc_id and null texts dropped."""
    kind, paths = find_document_tables(uri, storage_options)
    fs, _ = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    columns = list(REQUIRED_COLUMNS)
    if kind == "committed":
        from toolformer_ray.fsutil import is_local
        from toolformer_ray.storage import OutputStore

        parent, name = paths[0].rsplit("/", 1)
        store = OutputStore(parent if is_local(fs) else fs.unstrip_protocol(parent), name, storage_options)
        table = store.read_table("documents", columns=columns)
    else:
        tables = []
        for path in paths:
            try:
                schema = pq.read_schema(path, filesystem=fs)
            except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
                raise FinetuneDataError(f"cannot read {path} as Parquet: {e}") from None
            missing = [c for c in columns if c not in schema.names]
            if missing:
                raise FinetuneDataError(f"{path}: missing column(s) {missing}; a documents table needs {columns}")
            tables.append(pq.read_table(path, columns=columns, filesystem=fs)
                          .cast(pa.schema([(c, pa.string()) for c in columns])))
        table = pa.concat_tables(tables)
    return _clean(table)


def _clean(table: pa.Table) -> pa.Table:
    doc_ids = table.column("doc_id").to_pylist()
    texts = table.column("text").to_pylist()
    augmented = table.column("augmented_text").to_pylist()
    keep, seen = [], set()
    for i, (d, t, a) in enumerate(zip(doc_ids, texts, augmented)):
        if d is None or not t or d in seen:
            continue
        seen.add(d)
        keep.append(i)
    if len(keep) < len(doc_ids):
        log.info("documents: dropped %d rows (null text or id, or a repeated doc_id)", len(doc_ids) - len(keep))
    table = table.take(pa.array(keep, pa.int64()))
    # A document without calls may have a null augmented text: it is then its original text.
    aug = [a if a is not None else t for a, t in zip(table.column("augmented_text").to_pylist(),
                                                     table.column("text").to_pylist())]
    return table.set_column(table.schema.get_field_index("augmented_text"), "augmented_text", pa.array(aug, pa.string()))


# ------------------------------------------------------------------------------------------ split and pick

def _unit_hash(key: str) -> float:
    """A uniform number in [0, 1) from a string (stable across machines and Python runs)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def is_dev(doc_id: str, dev_fraction: float) -> bool:
    return _unit_hash("dev:" + doc_id) < dev_fraction


def split_dev(doc_ids: list[str], dev_fraction: float) -> np.ndarray:
    """Boolean mask of dev documents. With dev_fraction > 0 and two or more documents, at least one is dev
    (the one with the smallest hash), so a tiny table still gets a perplexity."""
    mask = np.array([is_dev(d, dev_fraction) for d in doc_ids], dtype=bool)
    if dev_fraction > 0 and not mask.any() and len(doc_ids) >= 2:
        mask[int(np.argmin([_unit_hash("dev:" + d) for d in doc_ids]))] = True
    return mask


@dataclass
class Selection:
    train_texts: list[str]  # augmented texts first, then the mixed-in originals
    n_augmented: int  # how many of train_texts are augmented (the rest are original texts)
    dev_texts: list[str]  # original texts of the dev documents, in hash order
    stats: dict = field(default_factory=dict)


def select_texts(table: pa.Table, original_text_ratio: float, dev_fraction: float, seed: int) -> Selection:
    doc_ids = table.column("doc_id").to_pylist()
    texts = table.column("text").to_pylist()
    augmented = table.column("augmented_text").to_pylist()
    dev = split_dev(doc_ids, dev_fraction)
    has_calls = np.array([a != t for a, t in zip(augmented, texts)], dtype=bool)
    train_idx = np.flatnonzero(~dev)
    aug_idx = [int(i) for i in train_idx if has_calls[i]]
    # Original texts to mix in: documents without calls first, then those with calls; a seeded hash order
    # inside each group, so a different seed draws a different subset.
    want = int(round(original_text_ratio * len(aug_idx)))
    pool = sorted((int(i) for i in train_idx), key=lambda i: (bool(has_calls[i]), _unit_hash(f"orig:{seed}:{doc_ids[i]}")))
    orig_idx = pool[:want]
    dev_idx = sorted(np.flatnonzero(dev).tolist(), key=lambda i: _unit_hash("dev:" + doc_ids[i]))
    stats = {
        "documents": len(doc_ids),
        "documents_with_calls": int(has_calls.sum()),
        "dev_documents": len(dev_idx),
        "train_augmented_texts": len(aug_idx),
        "train_original_texts": len(orig_idx),
        "original_texts_wanted": want,
    }
    if want > len(orig_idx):
        log.warning("original_text_ratio asks for %d original texts; only %d training documents", want, len(orig_idx))
    return Selection(train_texts=[augmented[i] for i in aug_idx] + [texts[i] for i in orig_idx],
                     n_augmented=len(aug_idx), dev_texts=[texts[i] for i in dev_idx], stats=stats)


# -------------------------------------------------------------------------------------- tokenize and pack

def result_spans(text: str, markers: Markers) -> list[tuple[int, int]]:
    """Character spans of the tool results in an augmented text: from just after the result marker to the
    end of the call (end marker included). That is what decoding appends, so the model never writes it."""
    res_tok = markers.result.strip()
    spans = []
    for fc in find_calls(text, markers):
        if fc.has_result_marker:
            r = text.find(res_tok, fc.start, fc.end)
            if r >= 0:
                spans.append((r + len(res_tok), fc.end))
    return spans


def token_mask_outside(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> np.ndarray:
    """1 for tokens to keep in the loss, 0 for tokens lying wholly inside one of `spans`. A token that
    straddles a span edge (e.g. "]." = end marker + text) stays in the loss."""
    keep = np.ones(len(offsets), dtype=np.uint8)
    if not spans:
        return keep
    starts = np.array([s for s, _ in offsets])
    ends = np.array([e for _, e in offsets])
    for a, b in spans:
        keep[(starts >= a) & (ends <= b) & (ends > starts)] = 0
    return keep


def tokenize_texts(texts: list[str], tokenizer, markers: Markers | None = None,
                   mask_results: bool = False, batch_size: int = 1024) -> list[tuple[np.ndarray, np.ndarray]]:
    """(token ids, keep mask) per text, without special tokens. With `mask_results`, tokens of tool results
    get mask 0 (found on the text with api_text.find_calls, mapped to tokens by character offsets)."""
    out = []
    for b in range(0, len(texts), batch_size):
        chunk = texts[b:b + batch_size]
        enc = tokenizer(chunk, add_special_tokens=False, return_offsets_mapping=mask_results,
                        return_attention_mask=False)
        for j, ids in enumerate(enc["input_ids"]):
            ids = np.asarray(ids, dtype=np.int32)
            if mask_results:
                keep = token_mask_outside(enc["offset_mapping"][j], result_spans(chunk[j], markers))
            else:
                keep = np.ones(len(ids), dtype=np.uint8)
            out.append((ids, keep))
    return out


@dataclass
class Packed:
    input_ids: np.ndarray  # [rows, max_length] int32
    loss_mask: np.ndarray  # [rows, max_length] uint8; column 0 is always 0
    lengths: np.ndarray  # [rows] int32: real tokens per row; the rest is padding

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def n_targets(self, rows=None) -> int:
        mask = self.loss_mask if rows is None else self.loss_mask[rows]
        return int(mask.sum())

    def digest(self) -> str:
        h = hashlib.sha256()
        for a in (self.input_ids, self.loss_mask, self.lengths):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()[:16]


def pack(docs: list[tuple[np.ndarray, np.ndarray]], max_length: int, eos_id: int, pad_id: int,
         bos_id: int | None = None) -> Packed:
    """Concatenate [BOS] + tokens + [EOS] per document and cut the stream into rows of `max_length`."""
    ids_parts, mask_parts = [], []
    for ids, keep in docs:
        if bos_id is not None:
            ids_parts.append(np.array([bos_id], np.int32))
            mask_parts.append(np.zeros(1, np.uint8))  # BOS is given, not predicted
        ids_parts.append(ids.astype(np.int32))
        mask_parts.append(keep.astype(np.uint8))
        ids_parts.append(np.array([eos_id], np.int32))
        mask_parts.append(np.ones(1, np.uint8))  # learn where a document ends
    if not ids_parts:
        empty = np.zeros((0, max_length), np.int32)
        return Packed(empty, empty.astype(np.uint8), np.zeros(0, np.int32))
    flat_ids = np.concatenate(ids_parts)
    flat_mask = np.concatenate(mask_parts)
    rows = -(-len(flat_ids) // max_length)
    input_ids = np.full(rows * max_length, pad_id, np.int32)
    loss_mask = np.zeros(rows * max_length, np.uint8)
    input_ids[:len(flat_ids)] = flat_ids
    loss_mask[:len(flat_mask)] = flat_mask
    input_ids = input_ids.reshape(rows, max_length)
    loss_mask = loss_mask.reshape(rows, max_length)
    loss_mask[:, 0] = 0  # the first token of a row has no context in the row
    lengths = np.full(rows, max_length, np.int32)
    lengths[-1] = len(flat_ids) - (rows - 1) * max_length
    return Packed(input_ids, loss_mask, lengths)


def gather_rows(packed: Packed, rows: np.ndarray) -> dict[str, np.ndarray]:
    """A batch: input_ids, attention_mask (1 on real tokens) and loss_mask for the given rows."""
    length = packed.input_ids.shape[1]
    attention = (np.arange(length)[None, :] < packed.lengths[rows][:, None]).astype(np.int64)
    return {"input_ids": packed.input_ids[rows].astype(np.int64), "attention_mask": attention,
            "loss_mask": packed.loss_mask[rows]}


# ------------------------------------------------------------------------------------------------- order

def epoch_permutation(n_rows: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n_rows)


def rows_at(positions: np.ndarray, n_rows: int, seed: int) -> np.ndarray:
    """Row index at each position of the training stream: epoch after epoch, each a seeded permutation."""
    positions = np.asarray(positions, dtype=np.int64)
    out = np.empty(len(positions), dtype=np.int64)
    for epoch in np.unique(positions // n_rows):
        sel = positions // n_rows == epoch
        out[sel] = epoch_permutation(n_rows, seed, int(epoch))[positions[sel] % n_rows]
    return out


@dataclass(frozen=True)
class BatchPlan:
    """How a global batch is cut: global = micro x accumulation x workers."""
    micro: int
    accumulation: int
    workers: int

    @property
    def global_batch(self) -> int:
        return self.micro * self.accumulation * self.workers

    def step_rows(self, step: int, n_rows: int, seed: int) -> np.ndarray:
        """All rows of optimizer step `step` (0-based), [accumulation, workers, micro]."""
        start = step * self.global_batch
        rows = rows_at(np.arange(start, start + self.global_batch), n_rows, seed)
        return rows.reshape(self.accumulation, self.workers, self.micro)

    def micro_rows(self, step: int, micro_index: int, rank: int, n_rows: int, seed: int) -> np.ndarray:
        return self.step_rows(step, n_rows, seed)[micro_index, rank]


def batch_plan(global_batch: int, micro: int, workers: int) -> BatchPlan:
    if global_batch % (micro * workers):
        raise FinetuneDataError(
            f"finetune.global_batch_size ({global_batch}) must be a multiple of micro_batch_size x num_workers "
            f"({micro} x {workers} = {micro * workers})")
    return BatchPlan(micro=micro, accumulation=global_batch // (micro * workers), workers=workers)


# ------------------------------------------------------------------------------------------------ prepare

@dataclass
class FinetuneData:
    train: Packed
    dev: Packed
    stats: dict

    def digest(self) -> str:
        return hashlib.sha256((self.train.digest() + self.dev.digest()).encode()).hexdigest()[:16]


def special_ids(tokenizer) -> tuple[int | None, int, int]:
    """(BOS if the tokenizer adds one itself, EOS, PAD): the scoring contract's convention for BOS."""
    probe = tokenizer("a").input_ids
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id] else None
    eos = tokenizer.eos_token_id
    if eos is None:
        raise FinetuneDataError("the tokenizer has no EOS token to separate packed documents")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return bos, eos, pad


def prepare_data(table: pa.Table, tokenizer, *, markers: Markers, max_length: int, original_text_ratio: float,
                 mask_tool_results: bool, dev_fraction: float, dev_max_sequences: int, seed: int) -> FinetuneData:
    """Documents table -> packed train rows (shuffled documents) and dev rows (original texts, capped)."""
    if table.num_rows == 0:
        raise FinetuneDataError("the documents table is empty")
    sel = select_texts(table, original_text_ratio, dev_fraction, seed)
    if not sel.train_texts:
        raise FinetuneDataError(
            f"nothing to train on: {sel.stats['documents']} documents, {sel.stats['documents_with_calls']} with "
            f"calls, {sel.stats['dev_documents']} held out for dev; run generate on more documents or raise "
            "finetune.original_text_ratio")
    bos, eos, pad = special_ids(tokenizer)
    aug = tokenize_texts(sel.train_texts[:sel.n_augmented], tokenizer, markers, mask_tool_results)
    orig = tokenize_texts(sel.train_texts[sel.n_augmented:], tokenizer)
    docs = aug + orig
    order = np.random.default_rng([seed, 1 << 20]).permutation(len(docs))  # mix documents before packing
    train = pack([docs[i] for i in order], max_length, eos, pad, bos)
    dev = pack(tokenize_texts(sel.dev_texts, tokenizer), max_length, eos, pad, bos)
    if len(dev) > dev_max_sequences:
        dev = Packed(dev.input_ids[:dev_max_sequences], dev.loss_mask[:dev_max_sequences],
                     dev.lengths[:dev_max_sequences])
    masked = sum(int((k == 0).sum()) for _, k in aug)
    stats = {**sel.stats,
             "train_rows": len(train), "train_tokens": int(train.lengths.sum()), "train_targets": train.n_targets(),
             "masked_result_tokens": masked, "dev_rows": len(dev), "dev_targets": dev.n_targets(),
             "max_length": max_length}
    return FinetuneData(train=train, dev=dev, stats=stats)
