"""Errors of the model package that the jobs turn into one-line messages (torch-free to import)."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message names the file, the layout and the
    tensors concerned."""
