"""One fine-tuning run on a generate output (finetune.data, default: this config's own output
version): DeepSpeed ZeRO under Ray Train, checkpoints and the exported model under finetune.output.
Submitting it again resumes from the latest checkpoint (or only re-exports a finished run).

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \
        -- python -m jobs.finetune --config configs/cluster.yaml
"""
from __future__ import annotations

from jobs import parse_config, run_main
from toolformer_ray.finetune import run_finetune


def main(argv: list[str] | None = None) -> None:
    def body() -> int:
        cfg = parse_config(argv, __doc__)
        print(run_finetune(cfg).describe(), flush=True)
        return 0

    run_main(body)


if __name__ == "__main__":
    main()
