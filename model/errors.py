"""The one error type for mistakes a user can fix: the CLI prints it as one line, no traceback."""


class UserError(Exception):
    """A problem caused by input (path, model id, option, file contents), with the fix to suggest."""

    def __init__(self, cause: str, fix: str = "") -> None:
        super().__init__(cause)
        self.cause = cause
        self.fix = fix

    def __str__(self) -> str:
        return f"{self.cause}; {self.fix}" if self.fix else self.cause
