"""One module per CLI verb: `add_arguments(parser)` and `run(args) -> exit status`."""


class CommandError(Exception):
    """A user-facing error: printed as one line, exit status 2."""
