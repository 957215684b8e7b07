"""One error type for every failure a user can fix: it carries what went wrong and how to fix it."""


class GptwoError(Exception):
    """A failure with a fix. The CLI prints it as one line `error: <what> — <fix>` and exits `code`."""

    def __init__(self, what: str, fix: str = "", code: int = 2):
        self.what, self.fix, self.code = what, fix, code
        super().__init__(f"{what} — {fix}" if fix else what)
