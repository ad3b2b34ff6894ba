"""The data job: corpus shards -> sampled, executed, scored calls -> kept calls in calls/*.parquet.

run.py (run_generate) plans the shards, starts the stages (stages.py) and hands them to the
scheduler (scheduler.py), which commits each shard (commit.py) once its calls are scored; keep.py
decides which calls are kept and records.py is the output contract (rows and Arrow schemas).
"""
