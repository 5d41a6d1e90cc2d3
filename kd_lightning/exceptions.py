"""The one exception a run raises for bad input it can only find while running (e.g. a download that fails): the
``kd-lightning`` command reports it in one line, as it reports a bad config, instead of a traceback."""


class InputError(ValueError):
    """Bad input found during a run (after the config was checked): a message for the user, not a bug."""
