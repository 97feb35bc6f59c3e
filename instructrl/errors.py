"""Error types whose messages are shown to users as one line (and exit status 2).

Each names what is wrong and where: `data/cmp.jsonl:17: ranking ...`, `config key 'ppo.foo'
does not exist`, `stage rm: input stage 'sft' has no export in DIR/sft`.
"""


class InstructrlError(ValueError):
    """Base of the errors that end a command with one clear line."""


class ConfigError(InstructrlError):
    """A bad config file, argument, key or value."""


class InputError(InstructrlError):
    """Bad input data, or a missing input stage."""


class Preempted(Exception):
    """A stage stopped on SIGTERM after saving a checkpoint; re-running resumes it."""
