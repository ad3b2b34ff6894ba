"""The BM25 passage index shared by WikiSearch and QA: built once, loaded by every worker.

`build_index(passages, output)` reads passages {id, title, text} (jsonl, optionally .gz; local or
s3://), indexes title + text with bm25s (English stop words, PyStemmer's English stemmer) and writes
a directory:

    bm25/            the bm25s index (sparse matrix + vocabulary; numpy files, no pickle)
    passages.arrow   the passages as an Arrow IPC file (memory-mapped when loaded: no copy per
                     worker)
    meta.json        format, counts, tokenizer settings and `build_id` (a content hash); written
                     last, so a directory without it is an unfinished build

`load_index(uri)` opens it; a remote index is downloaded once into a local cache directory keyed by
its build_id, so a rebuilt index is fetched again and an unchanged one never is.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from toolformer_ray.errors import UserError
from toolformer_ray.fsutil import is_local

INDEX_FORMAT = 1
STEMMER_LANGUAGE = "english"
STOPWORDS = "en"


class SearchIndexError(UserError, RuntimeError):
    """An index that cannot be built or loaded (reported as one line)."""


@dataclass(frozen=True)
class Hit:
    passage_id: str
    title: str
    text: str
    score: float


def _stemmer():
    import Stemmer

    return Stemmer.Stemmer(STEMMER_LANGUAGE)


def tokenize(texts: list[str], stemmer=None) -> list[list[str]]:
    """The index's own word tokenizer (lower-case words of 2+ characters, stop words out,
    stemmed)."""
    import bm25s

    return bm25s.tokenize(texts, stopwords=STOPWORDS, stemmer=stemmer or _stemmer(),
                          return_ids=False, show_progress=False)


def read_passages(uri: str) -> tuple[list[str], list[str], list[str], int]:
    """(ids, titles, texts, skipped) from a jsonl file; records without text (or not JSON) are
    skipped."""
    import fsspec

    ids, titles, texts, skipped = [], [], [], 0
    try:
        with fsspec.open(uri, "rt", encoding="utf-8", errors="replace", compression="infer") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    skipped += 1
                    continue
                text = rec.get("text") if isinstance(rec, dict) else None
                if not isinstance(text, str) or not text.strip():
                    skipped += 1
                    continue
                ids.append(str(rec.get("id", line_no)))
                titles.append(str(rec.get("title") or ""))
                texts.append(" ".join(text.split()))
    except FileNotFoundError:
        raise SearchIndexError(f"passages file not found: {uri}") from None
    return ids, titles, texts, skipped


def build_index(passages_uri: str, output_uri: str) -> dict:
    """Index a passages jsonl with BM25 and write the index directory (local or s3://).

    Returns {"passages", "skipped", "vocabulary", "build_id", "seconds"}.
    """
    import bm25s
    import fsspec
    import pyarrow as pa

    t0 = time.perf_counter()
    ids, titles, texts, skipped = read_passages(passages_uri)
    if not texts:
        raise SearchIndexError(f"no passages with text in {passages_uri}")
    digest = hashlib.sha256()
    for pid, title, text in zip(ids, titles, texts):
        digest.update(f"{pid}\x00{title}\x00{text}\x01".encode())
    digest.update(f"{INDEX_FORMAT}|{STEMMER_LANGUAGE}|{STOPWORDS}|{bm25s.__version__}".encode())
    build_id = digest.hexdigest()[:16]

    corpus_tokens = bm25s.tokenize([f"{t}\n{x}" if t else x for t, x in zip(titles, texts)],
                                   stopwords=STOPWORDS, stemmer=_stemmer(), show_progress=False)
    retriever = bm25s.BM25()
    retriever.index(corpus_tokens, show_progress=False)

    fs, root = fsspec.core.url_to_fs(output_uri)
    local = is_local(fs)
    parent = Path(root).parent if local else Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".index-tmp-", dir=parent))
    try:
        retriever.save(str(tmp / "bm25"), show_progress=False)
        table = pa.table({"id": ids, "title": titles, "text": texts})
        with pa.OSFile(str(tmp / "passages.arrow"), "wb") as sink:
            with pa.ipc.new_file(sink, table.schema) as w:
                w.write_table(table)
        meta = {"format": INDEX_FORMAT, "passages": len(texts), "skipped": skipped,
                "vocabulary": len(retriever.vocab_dict), "build_id": build_id,
                "source": passages_uri, "stemmer": STEMMER_LANGUAGE, "stopwords": STOPWORDS,
                "bm25s": bm25s.__version__}
        if local:
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
            target = Path(root)
            if target.exists():  # a rebuild: replace the old index whole
                shutil.rmtree(target)
            os.replace(tmp, target)
        else:
            if fs.exists(f"{root}/meta.json"):
                fs.rm(f"{root}/meta.json")  # the old index is incomplete from here on, never mixed
            fs.put(str(tmp) + "/", root, recursive=True)
            with fs.open(f"{root}/meta.json", "w") as f:  # last: marks the upload complete
                f.write(json.dumps(meta, indent=2))
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return {"passages": len(texts), "skipped": skipped, "vocabulary": meta["vocabulary"],
            "build_id": build_id, "seconds": round(time.perf_counter() - t0, 2)}


_BUILD_ID = re.compile(r"[0-9a-f]{1,64}")


def _safe_relative(rel: str) -> bool:
    """A relative name of plain parts: no "", ".", "..", backslash or NUL (a storage key can hold
    any)."""
    parts = rel.split("/")
    return bool(rel) and all(p not in ("", ".", "..") and "\\" not in p and "\0" not in p
                             for p in parts)


def _cache_root(cache_dir: str | None) -> Path:
    root = Path(cache_dir or os.environ.get("TOOLFORMER_INDEX_CACHE", ".cache/indexes"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def fetch_index(uri: str, cache_dir: str | None = None) -> Path:
    """A local directory holding the index at `uri` (downloaded once per build_id when remote)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(uri)
    hint = "build it with `toolformer-ray index PASSAGES OUTPUT`"
    if is_local(fs):
        path = Path(root)
        if not (path / "meta.json").is_file():
            raise SearchIndexError(f"no search index at {uri} ({hint})")
        return path
    try:
        meta = json.loads(fs.cat_file(f"{root}/meta.json"))
    except FileNotFoundError:
        raise SearchIndexError(f"no search index at {uri} ({hint})") from None
    except ValueError:
        raise SearchIndexError(f"{uri}/meta.json is not JSON ({hint})") from None
    # Names from storage become local paths: only a hex build id and plain relative names, never
    # "..", an absolute path or a separator trick, so a hostile bucket cannot write outside the
    # cache.
    build_id = meta.get("build_id") if isinstance(meta, dict) else None
    if not isinstance(build_id, str) or not _BUILD_ID.fullmatch(build_id):
        raise SearchIndexError(f"{uri}/meta.json has an invalid build_id {build_id!r} "
                               "(expected hex digits)")
    target = _cache_root(cache_dir) / f"index-{build_id}"
    if (target / "meta.json").is_file():
        return target
    files = []
    for path in sorted(fs.find(root)):
        rel = path[len(root.rstrip("/")):].lstrip("/")
        if not path.startswith(root.rstrip("/") + "/") or not _safe_relative(rel):
            raise SearchIndexError(f"search index at {uri} holds an unsafe file name {rel!r}")
        files.append(rel)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp", dir=target.parent))
    try:
        for rel in files:
            local = tmp.joinpath(*rel.split("/"))
            local.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f"{root.rstrip('/')}/{rel}", str(local))
        if not (tmp / "meta.json").is_file():
            raise SearchIndexError(f"incomplete search index at {uri} ({hint})")
        try:
            os.replace(tmp, target)
        except OSError:  # another worker finished the same download first
            if not (target / "meta.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


class SearchIndex:
    """A loaded index: `search(queries, k)` -> hits per query, best first (zero-score hits
    dropped)."""

    def __init__(self, path: str | os.PathLike):
        import bm25s
        import pyarrow as pa

        path = Path(path)
        self.meta = json.loads((path / "meta.json").read_text())
        if self.meta.get("format") != INDEX_FORMAT:
            raise SearchIndexError(f"index at {path} has format {self.meta.get('format')}, "
                                   f"expected {INDEX_FORMAT}; rebuild it with "
                                   "`toolformer-ray index`")
        self.retriever = bm25s.BM25.load(str(path / "bm25"), mmap=True, show_progress=False,
                                         verbosity=0)
        self.passages = pa.ipc.open_file(pa.memory_map(str(path / "passages.arrow"))).read_all()
        self._ids = self.passages.column("id")
        self._titles = self.passages.column("title")
        self._texts = self.passages.column("text")
        self.stemmer = _stemmer()
        self._lock = threading.Lock()  # bm25s and PyStemmer are not documented as thread-safe

    def __len__(self) -> int:
        return self.passages.num_rows

    def passage(self, i: int) -> tuple[str, str, str]:
        return self._ids[i].as_py(), self._titles[i].as_py(), self._texts[i].as_py()

    def search(self, queries: list[str], k: int = 1) -> list[list[Hit]]:
        if not queries:
            return []
        k = max(1, min(k, len(self)))
        with self._lock:
            tokens = tokenize(queries, self.stemmer)
            docs, scores = self.retriever.retrieve(tokens, k=k, show_progress=False, n_threads=1)
        out = []
        for row_docs, row_scores, toks in zip(docs, scores, tokens):
            hits = []
            if toks:
                for i, score in zip(row_docs, row_scores):
                    if score > 0:
                        pid, title, text = self.passage(int(i))
                        hits.append(Hit(pid, title, text, float(score)))
            out.append(hits)
        return out

    def query_stems(self, query: str) -> set[str]:
        with self._lock:
            return set(tokenize([query], self.stemmer)[0])


_LOADED: dict[tuple[str, str | None], SearchIndex] = {}
_LOADED_LOCK = threading.Lock()


def load_index(uri: str, cache_dir: str | None = None) -> SearchIndex:
    """The index at `uri`, loaded once per process (WikiSearch and QA share it)."""
    key = (str(uri), cache_dir)
    with _LOADED_LOCK:
        if key not in _LOADED:
            _LOADED[key] = SearchIndex(fetch_index(str(uri), cache_dir))
        return _LOADED[key]


_SENTENCE_END_RE = re.compile(r"[.!?]\s+(?=[A-Z0-9\"'(])")
# Not sentence ends: initials ("Ralph M. Brown") and common abbreviations.
_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "vs", "no", "mt", "ft", "gen",
                  "col", "lt", "sgt", "rev", "inc", "ltd", "co", "corp", "jan", "feb", "mar", "apr",
                  "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec", "approx", "etc", "e.g",
                  "i.e", "u.s", "u.k"}


def split_sentences(text: str) -> list[str]:
    sentences, start = [], 0
    for m in _SENTENCE_END_RE.finditer(text):
        word = text[start:m.start()].rsplit(None, 1)[-1] if text[start:m.start()].strip() else ""
        abbreviation = len(word) == 1 and word.isupper() or word.lower() in _ABBREVIATIONS
        if text[m.start()] == "." and abbreviation:
            continue
        sentences.append(text[start:m.start() + 1].strip())
        start = m.end()
    sentences.append(text[start:].strip())
    return [s for s in sentences if s]


def make_snippet(text: str, query_stems: set[str], max_chars: int, stemmer=None) -> str:
    """A short snippet of a passage: its sentence that shares most words with the query, then the
    following sentences while they fit in `max_chars`; cut at a word boundary (with "...") if
    needed."""
    sentences = split_sentences(" ".join(text.split()))
    if not sentences:
        return ""
    best = 0
    if query_stems and len(sentences) > 1:
        stemmed = tokenize(sentences, stemmer)
        overlap = [len(query_stems.intersection(toks)) for toks in stemmed]
        best = max(range(len(sentences)), key=lambda i: (overlap[i], -i))
    snippet = sentences[best]
    for nxt in sentences[best + 1:]:
        if len(snippet) + 1 + len(nxt) > max_chars:
            break
        snippet += " " + nxt
    if len(snippet) > max_chars:
        cut = snippet[:max_chars - 3].rsplit(" ", 1)[0].rstrip(",;:")
        snippet = (cut or snippet[:max_chars - 3]) + "..."
    return snippet
