"""The evaluation harness (paper, section 4.2): readers for the standard formats, the lenient
metrics, the Dateset generator, perplexity, and `run_eval` which writes a Markdown table, JSON and a
bar chart."""
from toolformer_ray.evaluation.dateset import generate_dateset, write_dateset
from toolformer_ray.evaluation.examples import DataError, Example, TaskData
from toolformer_ray.evaluation.metrics import (
                                               answer_in_first_words,
                                               extract_numbers,
                                               math_correct,
                                               normalize_answer,
                                               parse_answer_number,
)
from toolformer_ray.evaluation.perplexity import perplexity
from toolformer_ray.evaluation.readers import (
                                               read_lama,
                                               read_math,
                                               read_qa,
                                               read_task,
                                               read_temporal,
)
from toolformer_ray.evaluation.report import EvalReport, EvalRow
from toolformer_ray.evaluation.run import run_eval

__all__ = ["DataError", "EvalReport", "EvalRow", "Example", "TaskData", "answer_in_first_words",
           "extract_numbers", "generate_dateset", "math_correct", "normalize_answer",
           "parse_answer_number", "perplexity", "read_lama", "read_math", "read_qa", "read_task",
           "read_temporal", "run_eval", "write_dateset"]
