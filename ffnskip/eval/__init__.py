"""The evaluation harness: one task, one model, one skip policy, against the same model's dense
decoding (:func:`evaluate`; ``ffnskip evaluate`` is :mod:`ffnskip.eval.cli`).

Modules:

* :mod:`~ffnskip.eval.harness`: :func:`evaluate`, which runs the others and builds the report;
* :mod:`~ffnskip.eval.tasks`: the tasks (data, prompts, per-sample scoring, aggregation);
* :mod:`~ffnskip.eval.metrics`: answer matching, ROUGE, degeneration, fidelity to dense;
* :mod:`~ffnskip.eval.generation`: the generative tasks' dense and policy passes;
* :mod:`~ffnskip.eval.perplexity`: the perplexity task, teacher-forced;
* :mod:`~ffnskip.eval.teacher`: teacher-forced scoring (:func:`score_continuation`);
* :mod:`~ffnskip.eval.speed`: tokens/s of dense and the policy, alternating (:func:`measure_speed`);
* :mod:`~ffnskip.eval.judge`: the optional LLM judge;
* :mod:`~ffnskip.eval.cache`: the dense cache (:class:`DenseCache`);
* :mod:`~ffnskip.eval.identity`: model fingerprints and the decode code's version (cache keys);
* :mod:`~ffnskip.eval.report`: the runners' results and :class:`EvalReport`.
"""

from .cache import ENV_DENSE_CACHE, DenseCache, default_dense_cache, default_dense_cache_dir
from .harness import evaluate
from .identity import model_fingerprint
from .judge import Judge, JudgeConfig, JudgeError
from .report import EvalReport, RunResult
from .speed import measure_speed
from .tasks import TASKS, EvalError, Sample, Task, fingerprint, get_task, parse_field_mappings
from .teacher import PromptLogprobs, TeacherForced, prompt_logprobs, score_continuation

__all__ = [
    "DenseCache",
    "ENV_DENSE_CACHE",
    "EvalError",
    "EvalReport",
    "Judge",
    "JudgeConfig",
    "JudgeError",
    "RunResult",
    "Sample",
    "TASKS",
    "Task",
    "TeacherForced",
    "default_dense_cache",
    "default_dense_cache_dir",
    "evaluate",
    "fingerprint",
    "get_task",
    "measure_speed",
    "model_fingerprint",
    "parse_field_mappings",
    "PromptLogprobs",
    "prompt_logprobs",
    "score_continuation",
]
