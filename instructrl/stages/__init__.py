"""Stage drivers: one module per stage kind, each exposing `run(config, name, workdir)`.

The stage contract: stage `name` reads `config.<name>` and writes only `DIR/<name>/`; it
names its inputs by stage (`init_from`, `reward_from`, `tokenizer_from`, `@stage/file`
data paths) and, once finished, holds a `DONE` marker there. Helper modules for drivers,
not stages themselves: `driver.py` (model setup and the training loop), `common.py`
(metrics files, progress, NaN guard, SIGTERM), `inputs.py` (paths of other stages'
outputs), `lm.py` (the next-token driver behind `pretrain` and `sft`).
"""

DONE_MARKER = "DONE"  # written in DIR/<stage>/ when the stage has finished
