"""Where run-time commands come from: standard input, a command file or FIFO, or a signal.

Each source hands over complete text lines through a non-blocking :meth:`CommandSource.poll`.
Reading happens on a daemon thread that sleeps in ``poll(2)``/``select`` (or a timed wait for
a plain file), so the training thread never blocks on input and nothing spins. A signal
handler only sets a flag (work done inside a handler runs between any two bytecodes of the
training thread, so it can interrupt a backward pass or a save half-way), which the training
thread consumes at a step boundary.

A missing input is not an error: standard input at EOF, ``/dev/null``, closed, or absent
(CI, ``nohup``, ``pythonw``) simply yields no commands.

This module must never parse or execute commands, touch a trainer or a model, or raise out
of its reader threads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal as _signal
import stat
import sys
import threading
from abc import ABC, abstractmethod
from collections import deque
from pathlib import Path
from typing import Any

__all__ = [
    "CommandSource",
    "FileSource",
    "SignalFlag",
    "StdinSource",
    "resolve_source",
]

log = logging.getLogger(__name__)

try:  # poll(2) accepts regular files (always readable), unlike epoll, which refuses them.
    import select

    _HAVE_POLL = hasattr(select, "poll")
except ImportError:  # pragma: no cover
    _HAVE_POLL = False

# A "line" longer than this without a newline is garbage (a binary file, a stuck key); drop it.
_MAX_LINE_BYTES = 64 * 1024
_READ_CHUNK = 4096
_BACKGROUND_RECHECK_S = 0.5
# A command file re-saved by an editor is recognised by its start; files beyond this are not.
_MAX_REMEMBERED_BYTES = 1 << 20


class CommandSource(ABC):
    """A producer of command lines. ``start``/``close`` may be called again after ``close``."""

    @abstractmethod
    def start(self) -> None:
        """Begin reading (idempotent)."""

    @abstractmethod
    def poll(self) -> list[str]:
        """Return the complete, non-empty lines received since the last call; never blocks."""

    @abstractmethod
    def close(self) -> None:
        """Stop reading and release what ``start`` acquired (idempotent)."""


class _LineBuffer:
    """Turns a byte stream into stripped, non-empty text lines; keeps a partial last line."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, data: bytes) -> list[str]:
        self._pending += data
        *complete, self._pending = self._pending.split(b"\n")
        if len(self._pending) > _MAX_LINE_BYTES:
            log.warning("command input: dropped %d bytes without a newline", len(self._pending))
            self._pending = b""
        lines = (raw.decode("utf-8", errors="replace").strip() for raw in complete)
        return [line for line in lines if line]

    def flush(self) -> list[str]:
        """At EOF a last line without a newline still counts."""
        rest, self._pending = self._pending, b""
        line = rest.decode("utf-8", errors="replace").strip()
        return [line] if line else []


class _ThreadedSource(CommandSource):
    """Common machinery: a daemon thread appends lines to a deque the training thread drains."""

    _thread_name = "lightning-utils-commands"

    def __init__(self) -> None:
        self._lines: deque[str] = deque()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake_r: int | None = None
        self._wake_w: int | None = None

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        if not self._open():
            return
        if not self._read_available():
            return  # the input already ended (e.g. a pipe closed after its lines): no thread needed
        if hasattr(os, "pipe") and _HAVE_POLL:
            # A self-pipe lets close() wake a reader sleeping in poll() without a timeout.
            self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._run_guarded, name=self._thread_name, daemon=True)
        self._thread.start()

    def poll(self) -> list[str]:
        out = []
        while True:
            try:
                out.append(self._lines.popleft())  # deque.popleft is atomic: no lock needed
            except IndexError:
                return out

    def close(self) -> None:
        self._stop.set()
        if self._wake_w is not None:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=2.0)
        for fd in (self._wake_r, self._wake_w):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._wake_r = self._wake_w = None
        self._close_input()

    @property
    def is_reading(self) -> bool:
        """Whether the reader thread is alive (False once the input reached EOF or was absent)."""
        return self._thread is not None and self._thread.is_alive()

    # subclass hooks ---------------------------------------------------------------------------
    def _open(self) -> bool:
        """Acquire the input; return False when there is none (then no thread starts)."""
        return True

    def _read_available(self) -> bool:
        """Read, without blocking, what is already there; return False if the input ended."""
        return True

    def _close_input(self) -> None:
        pass

    @abstractmethod
    def _run(self) -> None: ...

    def _run_guarded(self) -> None:
        try:
            self._run()
        except Exception as err:  # noqa: BLE001 - whatever fails in a reader thread must not take the run down
            log.warning("command input stopped: %s: %s", type(err).__name__, err)

    def _wait_readable(self, fd: int) -> bool:
        """Sleep until ``fd`` is readable (True) or close() was called (False)."""
        if not _HAVE_POLL:
            return not self._stop.is_set()  # Windows: the read itself blocks
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLPRI)
        assert self._wake_r is not None
        poller.register(self._wake_r, select.POLLIN)
        while not self._stop.is_set():
            try:
                events = poller.poll()
            except InterruptedError:  # pragma: no cover - PEP 475 retries, but be safe
                continue
            if self._stop.is_set():
                return False
            if any(efd == fd for efd, _ in events):
                return True
            if events:  # only the wake pipe: close() was called
                return False
        return False


class StdinSource(_ThreadedSource):
    """Reads lines from standard input (file descriptor ``fd``, default ``sys.stdin``'s).

    It reads the raw descriptor with ``os.read`` rather than ``sys.stdin``: a daemon thread
    parked inside ``sys.stdin.readline`` holds the buffered reader's lock, which can abort the
    interpreter at shutdown. A TTY, a pipe, a regular file or ``/dev/null`` all work; at EOF the
    thread ends and the source stays silent. A closed or absent standard input yields nothing.
    """

    _thread_name = "lightning-utils-stdin"

    def __init__(self, fd: int | None = None) -> None:
        super().__init__()
        self._fd_arg = fd
        self._fd: int | None = None
        self._buffer = _LineBuffer()

    def _open(self) -> bool:
        fd = self._fd_arg
        if fd is None:
            stream = sys.stdin
            if stream is None:
                log.debug("no standard input: no commands will be read")
                return False
            try:
                fd = stream.fileno()
            except (AttributeError, ValueError, OSError):  # closed, or replaced (pytest capture)
                log.debug("standard input has no file descriptor: no commands will be read")
                return False
        try:
            os.fstat(fd)
        except OSError:
            log.debug("standard input (fd %s) is closed: no commands will be read", fd)
            return False
        self._fd = fd
        return True

    def _in_background(self) -> bool:
        """Whether stdin is our controlling terminal while our process group is not in the
        foreground (``python train.py &``): reading then stops the whole process with SIGTTIN
        (or fails with EIO), so the reader waits until the job is brought to the foreground."""
        if self._fd is None or not hasattr(os, "tcgetpgrp"):
            return False
        try:
            return os.isatty(self._fd) and os.tcgetpgrp(self._fd) != os.getpgrp()
        except OSError:  # a terminal that is not our controlling terminal: reading is safe
            return False

    def _read_available(self) -> bool:
        # Lines typed (or piped) before training started are read here, in the calling thread,
        # so that they are deterministically "before the first step" rather than racing the
        # reader thread's first wake-up.
        if not _HAVE_POLL or self._fd is None or self._in_background():
            return True
        poller = select.poll()
        poller.register(self._fd, select.POLLIN | select.POLLPRI)
        budget = 1 << 20  # an endless input (stdin from /dev/zero) must not stall the start
        while budget > 0 and poller.poll(0):
            budget -= _READ_CHUNK
            try:
                data = os.read(self._fd, _READ_CHUNK)
            except BlockingIOError:
                return True
            except OSError:
                return False
            if not data:
                self._lines.extend(self._buffer.flush())
                return False
            self._lines.extend(self._buffer.feed(data))
        return True

    def _run(self) -> None:
        assert self._fd is not None
        while self._wait_readable(self._fd):
            if self._in_background():
                # Typed lines belong to the shell while we are a background job; check again
                # twice a second (poll() would report the terminal readable and spin).
                if self._stop.wait(_BACKGROUND_RECHECK_S):
                    return
                continue
            try:
                data = os.read(self._fd, _READ_CHUNK)
            except BlockingIOError:  # someone made stdin non-blocking: wait again
                continue
            except OSError as err:  # EBADF after a close, EIO after a terminal hang-up
                log.debug("standard input unreadable (%s): no more commands", err)
                return
            if not data:  # EOF: /dev/null, a finished pipe, the end of a redirected file
                self._lines.extend(self._buffer.flush())
                return
            self._lines.extend(self._buffer.feed(data))


class FileSource(_ThreadedSource):
    """Reads commands appended to a file, or written into a FIFO (``mkfifo``), at ``path``.

    * FIFO: every line any writer sends is read (``echo save > PATH``). The FIFO is opened
      read-write so that it never reports EOF between writers, and the thread sleeps in poll().
    * Regular file: like ``tail -f``: lines appended after the run started are read
      (``echo save >> PATH``); what was already there belongs to an earlier run and is skipped.
      A file that does not exist yet is read from its start once it appears; a truncated file,
      or one replaced by different content, is read again from its start, while a file an
      editor saved again (renamed over the old one, still starting with the lines already
      read) only yields the lines that follow them. The file is checked every ``poll_interval``
      seconds.
    """

    _thread_name = "lightning-utils-command-file"

    def __init__(self, path: str | os.PathLike[str], poll_interval: float = 0.5) -> None:
        super().__init__()
        self.path = Path(path)
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be > 0 seconds, got {poll_interval!r}")
        if self.path.is_dir():
            raise ValueError(f"command source {str(self.path)!r} is a directory; expected a file or FIFO")
        self.poll_interval = float(poll_interval)
        self._fifo_fd: int | None = None
        self._offset = 0
        self._identity: tuple[int, int] | None = None
        self._seen: bytes | None = b""  # the file's bytes read (or skipped) so far, to spot a re-save
        self._buffer = _LineBuffer()

    def _open(self) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._identity, self._offset, self._seen = None, 0, b""
            return True
        if stat.S_ISFIFO(st.st_mode):
            # O_RDWR: we hold a writer end ourselves, so the FIFO never signals EOF (and poll()
            # never busy-returns POLLHUP) when a writer closes. O_NONBLOCK: open never waits.
            self._fifo_fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK)
            return True
        self._identity, self._offset = (st.st_dev, st.st_ino), st.st_size
        self._seen = self._head(st.st_size)
        return True

    def _head(self, size: int) -> bytes | None:
        """The first ``size`` bytes of the file (None when too long to keep or unreadable)."""
        if size > _MAX_REMEMBERED_BYTES:
            return None
        try:
            with open(self.path, "rb") as f:
                data = f.read(size)
        except OSError:
            return None
        return data if len(data) == size else None

    def _close_input(self) -> None:
        if self._fifo_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fifo_fd)
            self._fifo_fd = None

    def _run(self) -> None:
        if self._fifo_fd is not None:
            self._run_fifo(self._fifo_fd)
        else:
            self._run_file()

    def _run_fifo(self, fd: int) -> None:
        while self._wait_readable(fd):
            try:
                data = os.read(fd, _READ_CHUNK)
            except BlockingIOError:
                continue
            if data:
                self._lines.extend(self._buffer.feed(data))

    def _run_file(self) -> None:
        while not self._stop.wait(self.poll_interval):
            self._read_new()

    def _read_new(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._identity, self._offset, self._seen = None, 0, b""
            return
        identity = (st.st_dev, st.st_ino)
        if st.st_size < self._offset:  # truncated (or replaced by something shorter): a new file
            self._identity, self._offset, self._buffer, self._seen = identity, 0, _LineBuffer(), b""
        elif identity != self._identity:
            # Replaced (an editor writes a new file and renames it over the old one): when it
            # starts with everything already read, only what follows is new.
            seen = self._seen
            if self._identity is not None and seen is not None and self._head(len(seen)) == seen:
                self._identity = identity
            else:
                self._identity, self._offset, self._buffer, self._seen = identity, 0, _LineBuffer(), b""
        if st.st_size == self._offset:
            return
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            data = f.read(st.st_size - self._offset)
        self._offset += len(data)
        if self._seen is not None:
            self._seen = self._seen + data if len(self._seen) + len(data) <= _MAX_REMEMBERED_BYTES else None
        self._lines.extend(self._buffer.feed(data))


class SignalFlag:
    """A signal handler that only raises a flag; :meth:`consume` reads and lowers it.

    Install it from the main thread (Python only runs handlers there). :meth:`uninstall`
    puts back the handler that was there before.
    """

    def __init__(self, signum: int | str) -> None:
        self.signum = _signal_number(signum)
        self._raised = False
        self._previous: Any = None
        self._installed = False

    def _handler(self, signum: int, frame: Any) -> None:
        # Nothing else here: the handler may run between any two bytecodes of the training step.
        self._raised = True

    def install(self) -> bool:
        """Install the handler; return False (with a warning) where that is impossible."""
        if self._installed:
            return True
        if threading.current_thread() is not threading.main_thread():
            log.warning("signal %s: not in the main thread, so no handler is installed", self.name)
            return False
        self._previous = _signal.signal(self.signum, self._handler)
        self._installed = True
        return True

    def uninstall(self) -> None:
        if not self._installed:
            return
        self._installed = False
        if threading.current_thread() is threading.main_thread() and _signal.getsignal(self.signum) == self._handler:
            _signal.signal(self.signum, self._previous if self._previous is not None else _signal.SIG_DFL)

    def consume(self) -> bool:
        """Whether the signal arrived since the last call."""
        raised, self._raised = self._raised, False
        return raised

    @property
    def name(self) -> str:
        try:
            return _signal.Signals(self.signum).name
        except ValueError:
            return str(self.signum)


def _signal_number(signum: int | str) -> int:
    if isinstance(signum, int):
        return signum
    name = signum.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    number = getattr(_signal, name, None)
    if not isinstance(number, int):
        raise ValueError(f"signal {signum!r} does not exist on this platform")
    return int(number)


def resolve_source(source: str | os.PathLike[str] | CommandSource | None) -> CommandSource | None:
    """``"stdin"`` or ``"-"``: standard input; a path: :class:`FileSource`; ``None``: no source."""
    if source is None or isinstance(source, CommandSource):
        return source
    if isinstance(source, str) and source.strip().lower() in ("stdin", "-"):
        return StdinSource()
    if isinstance(source, (str, os.PathLike)):
        if str(source).strip() == "":
            raise ValueError("source must be 'stdin', a file or FIFO path, a CommandSource, or None; got ''")
        return FileSource(source)
    raise TypeError(
        f"source must be 'stdin', a file or FIFO path, a CommandSource, or None; got {type(source).__name__}"
    )
