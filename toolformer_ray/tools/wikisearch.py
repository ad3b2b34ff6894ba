"""WikiSearch: BM25 over a passage collection, returning a short snippet of the best passage(s).

The paper used a BM25 retriever over the KILT Wikipedia dump and returned short snippets. Here the
index is built once by `toolformer-ray index` (see search_index.py) and loaded lazily by each
worker.
"""
from __future__ import annotations

from pydantic import Field

from toolformer_ray.tools import register
from toolformer_ray.tools.base import Tool, ToolOptions, clean_result, unquote
from toolformer_ray.tools.search_index import load_index, make_snippet


class WikiSearchOptions(ToolOptions):
    # directory written by `toolformer-ray index` (local or s3://)
    index: str = "runs/index/passages"
    top_k: int = Field(1, gt=0, le=20)  # passages in the result, best first
    snippet_chars: int = Field(200, gt=20)  # per passage: the paper returns short snippets
    max_query_chars: int = Field(300, gt=0)
    cache_dir: str | None = None  # where a remote index is downloaded (default .cache/indexes)


@register
class WikiSearch(Tool):
    name = "WikiSearch"
    version = "1"
    Options = WikiSearchOptions

    def __init__(self, options=None):
        super().__init__(options)
        self._index = None

    def load(self) -> None:
        if self._index is None:
            self._index = load_index(self.options.index, self.options.cache_dir)

    @property
    def index(self):
        self.load()
        return self._index

    def _queries(self, inputs: list[str]) -> list[str | None]:
        out = []
        for inp in inputs:
            q = unquote(inp) if isinstance(inp, str) else ""
            out.append(q if q and len(q) <= self.options.max_query_chars else None)
        return out

    def run(self, inputs: list[str], dates: list[str | None] | None = None) -> list[str | None]:
        queries = self._queries(inputs)
        valid = [i for i, q in enumerate(queries) if q is not None]
        results: list[str | None] = [None] * len(inputs)
        if not valid:
            return results
        hits = self.index.search([queries[i] for i in valid], k=self.options.top_k)
        for i, row in zip(valid, hits):
            stems = self.index.query_stems(queries[i])
            snippets = [make_snippet(h.text, stems, self.options.snippet_chars)
                        for h in row]
            results[i] = clean_result(" | ".join(s for s in snippets if s))
        return results

    def diagnose(self, inp: str, date: str | None = None) -> str | None:
        q = unquote(inp) if isinstance(inp, str) else ""
        if not q:
            return "empty query"
        if len(q) > self.options.max_query_chars:
            return f"query longer than {self.options.max_query_chars} characters"
        if self.run([inp])[0] is None:
            return (f"no passage in the index ({len(self.index)} passages) "
                    "matches any word of the query")
        return None
