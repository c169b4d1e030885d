"""Errors that reach people: each says what was wrong and how to fix it."""


class PPDError(ValueError):
    """A user-facing problem (bad file, incompatible pieces, bad config).

    The message is complete on its own: it names the file/field and the fix, so callers (CLI, ComfyUI nodes) can show
    it as is, without a traceback.
    """


class IncompatibleError(PPDError):
    """Two pieces do not fit together (adapter vs Stage C, adapter vs user embedding, embedding vs embedding)."""


class FileFormatError(PPDError):
    """A file is missing, truncated, not safetensors, or not the kind of file expected."""
