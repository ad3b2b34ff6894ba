"""Per-task protocol: prompt, scorer and disallowed tools (paper, section 4.2)."""
from __future__ import annotations

from toolformer_ray.evaluation.examples import Example
from toolformer_ray.evaluation.metrics import answer_in_first_words, math_correct

ACCURACY_TASKS = ("math", "lama", "qa", "temporal")
TASKS = (*ACCURACY_TASKS, "perplexity")
_DEFAULT_WORDS = {"lama": 5, "qa": 20, "temporal": 20}
_DEFAULT_PROMPTS = {"math": "Question: {question}\nAnswer:", "lama": "{question}",
                    "qa": "Question: {question}\nAnswer:",
                    "temporal": "Question: {question}\nAnswer:"}
_DEFAULT_DISALLOWED = {"lama": ["WikiSearch"], "qa": ["QA"]}


def prompt_for(task: str, example: Example, eval_cfg) -> str:
    if example.meta.get("cloze"):  # a statement to complete (TempLAMA), not a question
        return example.question
    template = eval_cfg.prompts.get(task, _DEFAULT_PROMPTS[task])
    return template.replace("{question}", example.question)


def n_words(task: str, eval_cfg) -> int:
    return eval_cfg.words.get(task, _DEFAULT_WORDS.get(task, 20))


def is_correct(task: str, output: str, example: Example, eval_cfg) -> bool:
    """The lenient criterion: math compares numbers, the others look for the answer in the first N
    words."""
    if task == "math":
        return example.number is not None and math_correct(output, example.number)
    return answer_in_first_words(output, example.answers, n_words(task, eval_cfg))


def allowed_tools(task: str, available: list[str], eval_cfg) -> list[str]:
    banned = set(eval_cfg.disallowed_tools.get(task, _DEFAULT_DISALLOWED.get(task, [])))
    return [t for t in available if t not in banned]
