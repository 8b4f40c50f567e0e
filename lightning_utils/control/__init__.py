"""Run-time control of a training run, without Lightning: the command grammar and input sources.

What it is for: the torch-free parts of :class:`~lightning_utils.callbacks.TrainingControl`.

- ``commands``: a typed line (``save``, ``lr 1e-4``, ``export@5000``...) becomes an immutable
  command, or a ``CommandError`` that says what is accepted.
- ``sources``: where lines come from (stdin on a daemon thread, a file or FIFO, a signal flag).

What it must never do: touch a trainer or a model, or import ``lightning``.
"""
