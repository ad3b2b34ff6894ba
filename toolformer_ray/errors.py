"""User errors: bad config, missing input, unloadable model. The CLI prints them as one line and
exits 2."""


class UserError(Exception):
    """An error the user can fix; shown without a traceback."""
