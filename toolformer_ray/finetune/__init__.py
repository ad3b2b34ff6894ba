"""Fine-tuning on the augmented corpus C* with DeepSpeed ZeRO (stage 2 or 3) under Ray Train.

torchtune's split: one recipe (the driver's steps) and the components it calls.

    recipe.py     run_finetune: plan -> resources -> resume -> train -> pick best -> export ->
                  report
    worker.py     the Ray Train worker loop: DeepSpeed engine, steps, checkpoints (gloo +
                  DS_ACCELERATOR=cpu locally, NCCL on GPUs)
    data.py       C* -> packed token rows with a loss mask + dev split; (seed, step) -> rows
    losses.py     token NLL (calls disabled or not), dev perplexity across ranks
    ds_config.py  the DeepSpeed JSON, the lr schedule, bf16 support
    resume.py     the run's fingerprint, checkpoint verification before DeepSpeed unpickles
    export.py     hf/ per checkpoint (gathered to rank 0, checked on probe logits); publish the best
    progress.py   console lines, metrics.jsonl, TensorBoard, the loss curve

Output folder (`finetune.output`, local or s3://):
    run.json            the run's fingerprint (data digest, model, hyper-parameters): what resuming
                        needs
    checkpoints/        Ray Train storage: step_000010/ ... (DeepSpeed shards, probe.safetensors,
                        state.json, hf/: the Hugging Face folder of the weights at that step)
    model/              the exported best model (safetensors, config, tokenizer, finetune.json)
    metrics.jsonl       one line per logged step; tensorboard/ the same as TensorBoard events
    loss_curve.png

Resuming: Ray Train restores its checkpoint list from `checkpoints/`; the workers load the latest
DeepSpeed checkpoint (weights, optimizer, lr schedule) and continue at its step. The rows of step s
are a function of (seed, s) only (data.BatchPlan), so the resumed run trains on exactly the rows the
first one would have.
"""
from toolformer_ray.finetune.data import FinetuneDataError, FinetuneError
from toolformer_ray.finetune.ds_config import deepspeed_config, lr_factor, warmup_steps_for
from toolformer_ray.finetune.losses import token_nll
from toolformer_ray.finetune.progress import load_metrics, plot_loss_curve
from toolformer_ray.finetune.recipe import FinetuneResult, run_finetune
from toolformer_ray.finetune.resume import (_check_resumable, load_checkpoint_checked,
                                            verify_checkpoint)
from toolformer_ray.finetune.worker import FAIL_AT_STEP_ENV, TrainSpec, _worker_model_dir

__all__ = [
    "FAIL_AT_STEP_ENV", "FinetuneDataError", "FinetuneError", "FinetuneResult", "TrainSpec",
    "_check_resumable", "_worker_model_dir", "deepspeed_config", "load_checkpoint_checked",
    "load_metrics", "lr_factor", "plot_loss_curve", "run_finetune", "token_nll",
    "verify_checkpoint", "warmup_steps_for",
]
