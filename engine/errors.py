"""User-facing errors: each one is printed by the CLI as a single line and exits with code 2.

Raise these for bad input a person can fix (missing data, wrong config, damaged checkpoint); the message
names the file, field or value and says what to do. Internal bugs stay ordinary exceptions.
"""


class AsoseError(Exception):
    """Base class: the message is the whole story, no traceback is shown."""

    exit_code = 2


class ConfigError(AsoseError):
    pass


class DataError(AsoseError):
    pass


class CheckpointError(AsoseError):
    pass


class DamagedCheckpoint(CheckpointError):
    """The file is not a readable checkpoint (truncated, overwritten, another format). `problem` says what is
    wrong with it, without the advice the message adds (a resume replaces that advice with a better one)."""

    def __init__(self, path: str, problem: str, advice: str = "resume from another file in checkpoints/ or start "
                                                              "again"):
        super().__init__(f"{path}: {problem}; {advice}")
        self.problem = problem


class TrainingError(AsoseError):
    """The run cannot go on (e.g. too many non-finite losses); the last good checkpoint is intact."""

    exit_code = 3
