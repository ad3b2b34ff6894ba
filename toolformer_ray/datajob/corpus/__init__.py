"""Corpus input: listing (shards by content), record formats + quarantine, reading, splitting."""
from toolformer_ray.datajob.corpus.listing import (CorpusError, Shard, ShardPlan, hash_files,
                                                   list_shards)
from toolformer_ray.datajob.corpus.read import doc_id_for, normalize_text, plan_shards, read_shard
from toolformer_ray.datajob.corpus.split import split_text

__all__ = ["CorpusError", "Shard", "ShardPlan", "doc_id_for", "hash_files", "list_shards",
           "normalize_text", "plan_shards", "read_shard", "split_text"]
