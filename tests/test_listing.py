"""Input listing at scale: new files are hashed all in one call of a pluggable hasher (generate
gives Ray tasks; tests/test_multinode.py checks the driver hashes nothing there); cached ones
are not read again."""
from __future__ import annotations

import hashlib

from toolformer_ray.datajob.corpus import hash_files, list_shards


def test_new_files_go_to_the_hasher_in_one_call_and_cached_ones_not_at_all(tmp_path):
    for k in range(4):
        (tmp_path / f"part-{k}.jsonl").write_text(f'{{"text": "doc {k}"}}\n')
    (tmp_path / "part-9.jsonl").write_text('{"text": "doc 0"}\n')  # same bytes as part-0: read once
    calls = []

    def hasher(uris):
        calls.append(list(uris))
        return hash_files(uris)

    cache: dict[str, str] = {}
    shards = list_shards(str(tmp_path), hash_cache=cache, hasher=hasher)
    assert len(calls) == 1 and len(calls[0]) == 5 and len(shards) == 4
    assert shards[0].content_hash == hashlib.sha256(b'{"text": "doc 0"}\n').hexdigest()
    (tmp_path / "part-5.jsonl").write_text('{"text": "doc 5"}\n')
    again = list_shards(str(tmp_path), hash_cache=cache, hasher=hasher)
    assert calls[1] == [str(tmp_path / "part-5.jsonl")] and len(again) == 5
    assert [s.shard_id for s in again if s.name != "part-5.jsonl"] == [s.shard_id for s in shards]
