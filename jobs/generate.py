"""One data-generation run: annotate corpus.input and write <run.output>/<config hash>/ (calls,
documents, manifest, report). Committed shards are skipped, so submitting it again resumes a killed
run.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \
        -- python -m jobs.generate --config configs/cluster.yaml

Exit code 1 when a shard failed or the manifest could not be written (the others are committed;
submit again to retry the failed ones).
"""
from __future__ import annotations

from jobs import parse_config, run_main
from toolformer_ray.datajob.run import run_generate


def main(argv: list[str] | None = None) -> None:
    def body() -> int:
        cfg = parse_config(argv, __doc__)
        summary = run_generate(cfg, use_ray=True)
        print(summary.describe(), flush=True)
        return 0 if summary.ok else 1  # a failed shard, or the manifest not written

    run_main(body)


if __name__ == "__main__":
    main()
