"""Object storage (``s3://``, ``gs://``, ``az://``) and any other fsspec URL: uploads that appear whole
or not at all, streamed from memory, and parallel ranged reads.

What it is for: :mod:`lightning_utils.io.storage` sends every URL here. A write is an *upload*
object with ``write``, ``commit`` and ``abort``; the bytes stream straight from the caller's
memory into the store through a few bounded part buffers, and the object becomes visible under
its name only at ``commit``:

* S3 (``s3fs``): a multipart upload whose parts go up in parallel (``PARALLEL_PARTS`` in flight,
  each ``PART_SIZE`` bytes, doubling every 1000 parts so any size fits S3's 10,000-part limit);
  ``CompleteMultipartUpload`` publishes the object, ``AbortMultipartUpload`` throws the parts away.
  s3fs's own file object uploads its parts one at a time, and its ``put``/``pipe`` need the whole
  file on disk or in memory; the calls themselves go through s3fs (its credentials, endpoint,
  retries and extra arguments apply).
* GCS (``gcsfs``) and Azure (``adlfs``): their file objects opened with ``autocommit=False`` (a
  resumable upload, a list of staged blocks): the object appears at ``commit``, ``discard`` cancels.
* Anything else (``memory://``, ``sftp://``, ``hdfs://``...): the bytes go to a temporary name
  beside the target (``.lu-tmp-<random>.<name>``), which is then moved over it.

Reads fill the caller's buffers with byte ranges, ``READ_PARALLEL`` at a time: on S3 one GET of
up to ``READ_SPAN`` bytes each, its body streamed into place (s3fs's ``cat_file`` and ``cat_ranges``
return each range as a new ``bytes`` object, twice its size in transit); elsewhere ``cat_file``
reads of at most ``READ_CHUNK`` bytes, copied into place.

Back ends are optional extras, imported by fsspec only when a URL needs one; a missing one is an
``ImportError`` naming the extra to install. This module must never stage a whole file in RAM
or on local disk, and never leave a partial object under the final name.
"""

from __future__ import annotations

import contextlib
import io
import os
import posixpath
import re
import secrets
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from lightning_utils.io.errors import CheckpointWriteError

PART_SIZE = 8 << 20  # S3 needs at least 5 MiB per part but the last
PARALLEL_PARTS = 4  # parts uploading at once; memory is (PARALLEL_PARTS + 1) part buffers
READ_SPAN = 64 << 20  # bytes per ranged GET (S3: streamed into place, so memory does not grow with it)
READ_CHUNK = 4 << 20  # other back ends: bytes per ranged read (about two copies of each are held in flight)
READ_PARALLEL = 8  # ranged reads in flight
_PARTS_PER_SIZE = 1000  # the part size doubles every this many parts (S3 allows 10,000)
TEMP_PREFIX = ".lu-tmp-"  # as local staged files (lightning_utils.io.atomic)

# URL scheme -> (our extra, the package fsspec needs for it)
_EXTRAS: dict[str, tuple[str, str]] = {
    "s3": ("s3", "s3fs"), "s3a": ("s3", "s3fs"),
    "gs": ("gcs", "gcsfs"), "gcs": ("gcs", "gcsfs"),
    "az": ("azure", "adlfs"), "abfs": ("azure", "adlfs"), "abfss": ("azure", "adlfs"), "adl": ("azure", "adlfs"),
}  # fmt: skip
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]+(://|::)")


def is_url(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an fsspec URL (``s3://b/k``, ``memory://x``, ``simplecache::s3://...``).

    ``file://`` URLs are local paths, not URLs, here.
    """
    text = path if isinstance(path, str) else os.fspath(path)
    return isinstance(text, str) and bool(_URL.match(text)) and not text.startswith("file://")


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """The fsspec filesystem for ``url`` and the path inside it.

    A missing back end is an ``ImportError`` naming our extra (``pip install 'lightning-utils[s3]'``).
    """
    import fsspec  # a dependency of torch and of Lightning

    try:
        return fsspec.core.url_to_fs(url, **(storage_options or {}))
    except ImportError as exc:
        scheme = url.split("://", 1)[0].split("::")[-1].lower()
        if scheme in _EXTRAS:
            extra, package = _EXTRAS[scheme]
            raise ImportError(
                f"{url}: {scheme}:// URLs need {package}, which is not installed: "
                f"pip install 'lightning-utils[{extra}]'"
            ) from exc
        raise ImportError(f"{url}: the fsspec back end for this URL is not installed ({exc})") from exc
    except ValueError as exc:  # e.g. "Protocol not known"
        raise ValueError(f"{url}: not a URL fsspec can open ({exc})") from exc


# -- writing ------------------------------------------------------------------------------------


class Upload:
    """A binary writer whose bytes reach ``url`` only at :meth:`commit` (whole), or never (:meth:`abort`)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.written = 0

    def writable(self) -> bool:
        return True

    def flush(self) -> None:
        """Nothing to do: parts go up as they fill."""

    def tell(self) -> int:
        return self.written

    def write(self, data: Any) -> int:
        raise NotImplementedError

    def commit(self) -> None:
        raise NotImplementedError

    def abort(self) -> str | None:
        """Throw away what was sent; never raises. Returns a note when the clean-up itself failed."""
        raise NotImplementedError

    def _failed(self, exc: BaseException) -> CheckpointWriteError:
        return CheckpointWriteError(
            self.url, f"the upload failed ({type(exc).__name__}: {exc}); nothing partial was written under this name"
        )


class _PartReader(io.RawIOBase):
    """A part buffer as a seekable file: botocore reads it in small chunks (checksumming as it
    goes, and rewinding to retry) instead of copying the whole buffer, as it does with a bytes-like
    body."""

    def __init__(self, buf: bytearray, length: int) -> None:
        super().__init__()
        self._view = memoryview(buf)[:length]
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = min(len(b), len(self._view) - self._pos)
        memoryview(b).cast("B")[:n] = self._view[self._pos : self._pos + n]
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, min(len(self._view), base + offset))
        return self._pos

    def tell(self) -> int:
        return self._pos

    def __len__(self) -> int:
        return len(self._view)


class _S3MultipartUpload(Upload):
    """A streaming S3 multipart upload with parallel parts and a bounded set of part buffers."""

    def __init__(self, fs: Any, path: str, url: str, part_size: int, parallel: int) -> None:
        super().__init__(url)
        self._fs, self._path = fs, path
        self._bucket, self._key, _ = fs.split_path(path)
        self._part_size, self._parallel = part_size, max(1, parallel)
        self._buf = bytearray(part_size)
        self._fill = 0
        self._free: list[bytearray] = []
        self._inflight: deque[Future] = deque()
        self._parts: list[dict[str, Any]] = []
        self._upload_id: str | None = None
        self._pool: ThreadPoolExecutor | None = None

    def _call(self, method: str, **kwargs: Any) -> Any:
        return self._fs.call_s3(method, Bucket=self._bucket, Key=self._key, **kwargs)

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        pos, total = 0, len(view)
        try:
            while pos < total:
                take = min(total - pos, len(self._buf) - self._fill)
                self._buf[self._fill : self._fill + take] = view[pos : pos + take]
                self._fill += take
                pos += take
                if self._fill == len(self._buf):
                    self._send_part()
        except CheckpointWriteError:
            raise
        except Exception as exc:
            raise self._failed(exc) from exc
        self.written += total
        return total

    def _size_of_part(self, number: int) -> int:
        return self._part_size << ((number - 1) // _PARTS_PER_SIZE)

    def _send_part(self, last: bool = False) -> None:
        if self._upload_id is None:
            self._upload_id = self._call("create_multipart_upload")["UploadId"]
            self._pool = ThreadPoolExecutor(self._parallel, thread_name_prefix="lightning-utils-upload")
        assert self._pool is not None
        number = len(self._parts) + len(self._inflight) + 1
        self._inflight.append(self._pool.submit(self._upload_part, number, self._buf, self._fill))
        while len(self._inflight) > self._parallel:  # buffers: `parallel` in flight + the one filling
            self._finish_oldest()
        self._buf, self._fill = (bytearray() if last else self._next_buffer(self._size_of_part(number + 1))), 0

    def _next_buffer(self, size: int) -> bytearray:
        while self._free:
            buf = self._free.pop()
            if len(buf) == size:
                return buf
        return bytearray(size)

    def _upload_part(self, number: int, buf: bytearray, length: int) -> tuple[dict[str, Any], bytearray]:
        out = self._call("upload_part", UploadId=self._upload_id, PartNumber=number, Body=_PartReader(buf, length))
        part = {"PartNumber": number, "ETag": out["ETag"]}
        part.update({k: v for k, v in out.items() if k.startswith("Checksum")})
        return part, buf

    def _finish_oldest(self) -> None:
        part, buf = self._inflight.popleft().result()
        self._parts.append(part)
        self._free.append(buf)

    def commit(self) -> None:
        try:
            if self._upload_id is None:  # it all fits in one part: one PUT, atomic as well
                self._call("put_object", Body=bytes(memoryview(self._buf)[: self._fill]))
            else:
                if self._fill:
                    self._send_part(last=True)
                while self._inflight:
                    self._finish_oldest()
                parts = sorted(self._parts, key=lambda p: p["PartNumber"])
                self._call("complete_multipart_upload", UploadId=self._upload_id, MultipartUpload={"Parts": parts})
                self._upload_id = None
        except Exception as exc:
            raise self._failed(exc) from exc
        finally:
            self._buf, self._free = bytearray(), []
        self._close_pool()
        self._fs.invalidate_cache(self._path)

    def abort(self) -> str | None:
        for future in self._inflight:
            future.cancel()
        for future in self._inflight:  # parts already on the wire: let them end before the abort
            with contextlib.suppress(BaseException):
                future.exception()
        self._inflight.clear()
        self._close_pool()
        self._buf, self._free = bytearray(), []
        if self._upload_id is None:
            return None
        upload_id, self._upload_id = self._upload_id, None
        try:
            self._call("abort_multipart_upload", UploadId=upload_id)
        except Exception as exc:  # noqa: BLE001 - reported in the error the caller raises
            return (
                f"its incomplete multipart upload {upload_id} could not be aborted ({type(exc).__name__}: {exc}); "
                "it is invisible, and a bucket lifecycle rule (AbortIncompleteMultipartUpload) removes it"
            )
        return None

    def _close_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


class _FileObjectUpload(Upload):
    """An upload through a file object of the back end (``self._file``), which subclasses open."""

    _file: Any

    def write(self, data: Any) -> int:
        try:
            n = self._file.write(data)
        except Exception as exc:
            raise self._failed(exc) from exc
        self.written += len(memoryview(data).cast("B"))
        return n


class _FileUpload(_FileObjectUpload):
    """A back end's own deferred-commit file (gcsfs, adlfs): visible at ``commit``, cancelled by ``discard``."""

    def __init__(self, fs: Any, path: str, url: str) -> None:
        super().__init__(url)
        self._file = fs.open(path, "wb", autocommit=False)

    def commit(self) -> None:
        try:
            self._file.close()
            self._file.commit()
        except Exception as exc:
            raise self._failed(exc) from exc

    def abort(self) -> str | None:
        try:
            self._file.discard()
        except Exception as exc:  # noqa: BLE001 - reported in the error the caller raises
            return f"its upload could not be cancelled ({type(exc).__name__}: {exc})"
        finally:
            self._file.closed = True  # closing it now would publish what was written
        return None


class _StagedUpload(_FileObjectUpload):
    """Any other filesystem: write a temporary name beside the target, then move it over the target."""

    def __init__(self, fs: Any, path: str, url: str) -> None:
        super().__init__(url)
        self._fs, self._path = fs, path
        parent, name = posixpath.split(path.rstrip("/"))
        self._tmp = posixpath.join(parent, f"{TEMP_PREFIX}{secrets.token_hex(6)}.{name[:200]}")
        self._file = fs.open(self._tmp, "wb")

    def commit(self) -> None:
        try:
            self._file.close()
            self._fs.mv(self._tmp, self._path)
        except Exception as exc:
            raise self._failed(exc) from exc

    def abort(self) -> str | None:
        with contextlib.suppress(Exception):
            self._file.close()
        try:
            if self._fs.exists(self._tmp):
                self._fs.rm(self._tmp)
        except Exception as exc:  # noqa: BLE001 - reported in the error the caller raises
            return f"its temporary file {self._tmp} could not be removed ({type(exc).__name__}: {exc})"
        return None


def open_upload(
    url: str,
    storage_options: dict[str, Any] | None = None,
    *,
    part_size: int | None = None,
    parallel: int | None = None,
) -> Upload:
    """An :class:`Upload` to ``url`` (S3 multipart, a back end's deferred commit, or stage-and-move).

    ``part_size`` and ``parallel`` (S3 only) default to :data:`PART_SIZE` and :data:`PARALLEL_PARTS`.
    """
    part_size = PART_SIZE if part_size is None else part_size
    parallel = PARALLEL_PARTS if parallel is None else parallel
    fs, path = filesystem(url, storage_options)
    if not _is_object_store(fs) and fs.isdir(path):
        raise IsADirectoryError(f"{url}: is a directory, cannot write a checkpoint file there")
    package = type(fs).__module__.split(".")[0]
    if package == "s3fs":
        if part_size < 5 << 20:
            raise ValueError(f"part_size {part_size} is below S3's 5 MiB minimum")
        return _S3MultipartUpload(fs, path, url, part_size, parallel)
    if package in ("gcsfs", "adlfs"):
        return _FileUpload(fs, path, url)
    return _StagedUpload(fs, path, url)


def _is_object_store(fs: Any) -> bool:
    return type(fs).__module__.split(".")[0] in ("s3fs", "gcsfs", "adlfs")


@contextlib.contextmanager
def atomic_upload(url: str, storage_options: dict[str, Any] | None = None, **options: Any) -> Iterator[Upload]:
    """``with atomic_upload(url) as f: f.write(...)``: the object appears whole when the block exits,
    and not at all if it raises (the upload is aborted; the object already there is untouched)."""
    upload = open_upload(url, storage_options, **options)
    try:
        yield upload
        upload.commit()
    except BaseException as exc:
        note = upload.abort()
        if note and isinstance(exc, CheckpointWriteError):
            raise CheckpointWriteError(url, f"{exc.reason}; {note}") from exc.__cause__
        raise


# -- reading ------------------------------------------------------------------------------------


def size(url: str, storage_options: dict[str, Any] | None = None) -> int:
    """The object's size in bytes; ``FileNotFoundError`` naming ``url`` if there is none."""
    fs, path = filesystem(url, storage_options)
    fs.invalidate_cache(path)  # a listing cached earlier may describe an object replaced since
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{url}: no such checkpoint file") from None
    if info.get("type") == "directory":
        raise IsADirectoryError(f"{url}: is a directory, not a checkpoint file")
    return int(info["size"])


def read_range(url: str, start: int, end: int, storage_options: dict[str, Any] | None = None) -> bytes:
    """Bytes ``[start, end)`` of the object (fewer if it is shorter)."""
    fs, path = filesystem(url, storage_options)
    if end <= start:
        return b""
    return bytes(fs.cat_file(path, start=start, end=end))


def read_into(
    url: str,
    pieces: Sequence[tuple[int, memoryview]],
    storage_options: dict[str, Any] | None = None,
    *,
    span: int | None = None,
    chunk: int | None = None,
    parallel: int | None = None,
) -> None:
    """Fill each buffer of ``pieces`` (``(offset in the object, writable byte buffer)``) from the object.

    The byte ranges are cut into spans of at most ``span`` bytes (contiguous pieces share a span),
    ``parallel`` spans in flight. S3: one ranged GET per span, its body streamed straight into
    the buffers, so the extra memory is a few small network chunks per span, whatever the span
    size. Other back ends: ranged reads of at most ``chunk`` bytes, each copied into place (extra
    memory about two chunks per span in flight). A short read (the object is shorter than the
    caller expects) raises ``EOFError`` naming the URL.
    """
    span = READ_SPAN if span is None else span
    chunk = READ_CHUNK if chunk is None else chunk
    parallel = READ_PARALLEL if parallel is None else parallel
    fs, path = filesystem(url, storage_options)
    spans = _spans(pieces, span)
    if not spans:
        return
    if type(fs).__module__.split(".")[0] == "s3fs":
        from fsspec.asyn import sync

        sync(fs.loop, _s3_read_spans, fs, path, url, spans, parallel)
        return
    jobs = [
        (offset + start, view[start : start + chunk])
        for segments in spans
        for offset, view in segments
        for start in range(0, len(view), chunk)
    ]
    failed = threading.Event()

    def fetch(offset: int, dest: memoryview) -> None:
        if failed.is_set():
            return
        data = fs.cat_file(path, start=offset, end=offset + len(dest))
        if len(data) != len(dest):
            failed.set()
            raise _short_read(url, offset, len(dest), len(data))
        dest[:] = data

    with ThreadPoolExecutor(min(parallel, len(jobs)), thread_name_prefix="lightning-utils-read") as pool:
        futures = [pool.submit(fetch, offset, dest) for offset, dest in jobs]
        try:
            for future in futures:
                future.result()
        except BaseException:
            failed.set()
            for future in futures:
                future.cancel()
            raise


def _short_read(url: str, offset: int, expected: int, got: int) -> EOFError:
    return EOFError(
        f"{url}: expected {expected} bytes at offset {offset}, got {got} "
        "(the object is shorter than its header says: truncated, or replaced while being read)"
    )


def _spans(pieces: Sequence[tuple[int, memoryview]], span: int) -> list[list[tuple[int, memoryview]]]:
    """``pieces`` cut and grouped into spans: each a list of segments contiguous in the object,
    ``span`` bytes at most in all."""
    spans: list[list[tuple[int, memoryview]]] = []
    current: list[tuple[int, memoryview]] = []
    filled = end = 0
    for offset, buf in sorted(pieces, key=lambda p: p[0]):
        view = buf.cast("B") if buf.format != "B" else buf
        pos = 0
        while pos < len(view):
            if current and (offset + pos != end or filled >= span):
                spans.append(current)
                current, filled = [], 0
            take = min(len(view) - pos, span - filled)
            current.append((offset + pos, view[pos : pos + take]))
            pos += take
            filled += take
            end = offset + pos
    if current:
        spans.append(current)
    return spans


async def _s3_read_spans(
    fs: Any, path: str, url: str, spans: list[list[tuple[int, memoryview]]], parallel: int
) -> None:
    import asyncio

    bucket, key, version = fs.split_path(path)
    extra = {"VersionId": version} if version else {}
    gate = asyncio.Semaphore(parallel)

    async def read_span(segments: list[tuple[int, memoryview]]) -> None:
        start = segments[0][0]
        end = segments[-1][0] + len(segments[-1][1])
        async with gate:
            for attempt in range(3):  # a dropped connection mid-body is retried from the start of the span
                # s3fs's coroutine form of call_s3: its credentials, retries and extra arguments apply
                response = await fs._call_s3(
                    "get_object", Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}", **extra
                )
                body = response["Body"]
                try:
                    for offset, view in segments:
                        done = 0
                        while done < len(view):
                            data = await body.read(min(len(view) - done, 1 << 20))
                            if not data:
                                raise _short_read(url, offset, len(view), done)
                            view[done : done + len(data)] = data
                            done += len(data)
                    return
                except EOFError:
                    raise
                except Exception:
                    if attempt == 2:
                        raise
                finally:
                    body.close()

    tasks = [asyncio.ensure_future(read_span(segments)) for segments in spans]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def open_read(url: str, storage_options: dict[str, Any] | None = None) -> Any:
    """A seekable binary file object reading ``url`` (fsspec's buffered file)."""
    fs, path = filesystem(url, storage_options)
    try:
        return fs.open(path, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"{url}: no such checkpoint file") from None


# -- listing and removing -------------------------------------------------------------------------


def read_all(url: str, storage_options: dict[str, Any] | None = None) -> bytes:
    """The whole object (for small ones: an index, a config); ``FileNotFoundError`` naming ``url``."""
    fs, path = filesystem(url, storage_options)
    try:
        return bytes(fs.cat_file(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{url}: no such file") from None


def exists(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    fs, path = filesystem(url, storage_options)
    fs.invalidate_cache(path)
    return bool(fs.exists(path))


def kind(url: str, storage_options: dict[str, Any] | None = None) -> str | None:
    """``"file"`` for an object, ``"directory"`` for a prefix with objects under it, ``None`` for nothing."""
    fs, path = filesystem(url, storage_options)
    fs.invalidate_cache(path)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return None
    return "directory" if info.get("type") == "directory" else "file"


def makedirs(url: str, storage_options: dict[str, Any] | None = None) -> None:
    """Create the directory ``url`` where the back end has directories; object stores have none."""
    fs, path = filesystem(url, storage_options)
    if not _is_object_store(fs):
        fs.makedirs(path, exist_ok=True)


def listdir(url: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """The names (not URLs) of what is directly under ``url``, sorted; empty if nothing is."""
    fs, path = filesystem(url, storage_options)
    fs.invalidate_cache(path)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    base = path.rstrip("/")
    return sorted(posixpath.basename(str(e).rstrip("/")) for e in entries if str(e).rstrip("/") != base)


def remove(url: str, storage_options: dict[str, Any] | None = None, *, first: Sequence[str] = ()) -> None:
    """Remove the object (or everything under the prefix) at ``url``; nothing there is not an error.

    ``first``: names under a prefix to delete before the rest (a directory's commit marker, so
    that a half-deleted directory no longer looks complete).
    """
    fs, path = filesystem(url, storage_options)
    fs.invalidate_cache(path)
    if first:
        with contextlib.suppress(FileNotFoundError):
            if fs.info(path).get("type") == "directory":
                for name in first:
                    with contextlib.suppress(FileNotFoundError):
                        fs.rm_file(posixpath.join(path.rstrip("/"), name))
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path, recursive=True)
    fs.invalidate_cache(path)


def remove_shadowed(
    url: str, keep: str, storage_options: dict[str, Any] | None = None, *, first: Sequence[str] = ()
) -> None:
    """On object storage, where one name can be an object and a prefix at once, delete the one of
    the two that ``keep`` (``"file"`` or ``"directory"``) does not name: the objects under the
    prefix ``url/`` (``first`` names first), or the object ``url`` itself. Nothing to do on other
    back ends, where a file and a directory cannot share a name."""
    fs, path = filesystem(url, storage_options)
    if not _is_object_store(fs):
        return
    base = path.rstrip("/")
    if keep == "directory":
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(base)
    elif keep == "file":
        fs.invalidate_cache(base)
        try:
            found = fs.find(base + "/")
        except FileNotFoundError:
            found = []
        # find() of a file's own name gives that file back: keep only what lies under the prefix
        children = [str(c) for c in found if str(c).startswith(base + "/")]
        ordered = [c for c in children if posixpath.basename(c) in first] + [
            c for c in children if posixpath.basename(c) not in first
        ]
        for child in ordered:
            with contextlib.suppress(FileNotFoundError):
                fs.rm_file(child)
    else:
        raise ValueError(f"keep must be 'file' or 'directory', got {keep!r}")
    fs.invalidate_cache(base)


def move(src: str, dst: str, storage_options: dict[str, Any] | None = None) -> None:
    """Move ``src`` over ``dst`` (same filesystem). On object stores this is a server-side copy, then
    a delete: ``dst`` appears whole, but ``src`` and ``dst`` both exist for a moment."""
    fs, src_path = filesystem(src, storage_options)
    _, dst_path = filesystem(dst, storage_options)
    fs.mv(src_path, dst_path)
    fs.invalidate_cache(src_path)
    fs.invalidate_cache(dst_path)
