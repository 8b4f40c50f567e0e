"""Run-time control of a training run, without Lightning: grammar, sources, rules and actions.

What it is for: everything :class:`~lightning_utils.callbacks.TrainingControl` does that needs
no trainer, so it can be read and tested on its own.

- ``commands``: a typed line (``save``, ``lr 1e-4``, ``export@5000``...) becomes an immutable
  command, or a ``CommandError`` that says what is accepted.
- ``sources``: where lines come from (stdin on a daemon thread, a file or FIFO, a signal flag).
- ``dispatch``: which command triggers which action, under which flags, as data (and the table
  of it the docs show); the periodic cadences.
- ``actions``: setting the lr (schedules continue from it) and the loss scale, timing steps,
  the time left.

What it must never do: touch a trainer, or import ``lightning``.
"""
