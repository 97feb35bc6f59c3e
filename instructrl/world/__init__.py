"""The built-in synthetic instruction world for the tiny InstructGPT experiment.

Prompts look like "Instruction: Reverse the words: cat dog sun\\nAnswer:" and the response is
the text the model writes after "Answer:" (demonstrations: " sun dog cat" + EOS).

    paths = write_world("data/world", seed=0)          # all JSONL files (docs/design.md formats)
    score(record, response, stopped=True) -> [0, 1]     # gold scorer, partial credit
"""

from instructrl.world.corpus import (
    few_shot_examples,
    few_shot_prompt,
    make_demonstration,
    pretrain_corpus,
    public_task,
    public_task_accuracy,
    synthetic_responses,
)
from instructrl.world.families import (
    EXTRA_TEXT_FACTOR,
    FAMILIES,
    FAMILY_NAMES,
    NO_STOP_FACTOR,
    gold_answer,
    make_prompt,
    score,
    slip,
)
from instructrl.world.splits import prompt_split, split_prompts, write_world
from instructrl.world.vocab import (
    FILLERS,
    HEDGES,
    PROMPT_SUFFIX,
    VISIBLE_FLAWS,
    drop_trailing_fillers,
    format_completion,
    format_prompt,
    visible_flaws,
)

__all__ = [
    "EXTRA_TEXT_FACTOR",
    "FAMILIES",
    "FAMILY_NAMES",
    "FILLERS",
    "HEDGES",
    "NO_STOP_FACTOR",
    "PROMPT_SUFFIX",
    "VISIBLE_FLAWS",
    "drop_trailing_fillers",
    "few_shot_examples",
    "few_shot_prompt",
    "format_completion",
    "format_prompt",
    "gold_answer",
    "make_demonstration",
    "make_prompt",
    "pretrain_corpus",
    "prompt_split",
    "public_task",
    "public_task_accuracy",
    "score",
    "slip",
    "split_prompts",
    "synthetic_responses",
    "visible_flaws",
    "write_world",
]
