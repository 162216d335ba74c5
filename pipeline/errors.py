"""The one exception type the CLI turns into a one-line message and an exit code."""


class CbirError(Exception):
    """A problem the user can fix; `exit_code` 2 means bad input, 1 a failed check."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code
