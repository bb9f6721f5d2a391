"""Where shards and manifests are read from: a local folder, a URL, or a ``pipe:`` command.

``paths.shards`` (the image shards) and ``features.root`` (the feature cache) name a root, and
every manifest and shard is a path under it (``join(root, "rsicd", "manifest.json")``). A root
may be

- a local folder;
- a URL that fsspec opens: ``http(s)://``, ``file://``, and object stores whose fsspec package
  is installed (``s3://`` with s3fs, ``gs://`` with gcsfs, ``az://`` with adlfs, ...). HTTP
  shards are streamed with one GET each (a server need not support range requests);
- ``pipe:COMMAND``: WebDataset's ``gopen`` runs ``COMMAND/<relative path>`` in a shell and
  reads its standard output, so the command must take the location last, e.g.
  ``pipe:curl -s -f -L https://host/shards`` or ``pipe:gsutil cat gs://bucket/shards``.

fsspec rather than WebDataset's own ``http`` handler reads HTTP: that handler runs curl with 30
retries 2 s apart, which turns a failing server into a minute of silence, and reports only
curl's exit code; fsspec fails at once with the HTTP status. Every error names the location.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any, Protocol

import fsspec
import webdataset as wds
from webdataset.gopen import Pipe
from webdataset.tariterators import group_by_keys, tar_file_expander

PIPE = "pipe:"
# fsspec's default HTTP file reads by range requests, which e.g. Python's http.server ignores
_OPEN_OPTIONS = {"http": {"block_size": 0}, "https": {"block_size": 0}}


class StorageError(OSError):
    """A manifest or shard that could not be read; the message names it and says why."""


def is_local(location: str | Path) -> bool:
    """True for a plain path, False for a URL (``scheme://``) or a ``pipe:`` command."""
    text = str(location)
    return not (text.startswith(PIPE) or "://" in text)


def join(root: str | Path, *parts: str) -> str:
    """``root/part/...`` for a folder, a URL or a ``pipe:`` command alike."""
    if is_local(root):
        return str(Path(root).joinpath(*parts))
    return "/".join([str(root).rstrip("/"), *parts])


def read_bytes(location: str) -> bytes:
    """The whole content of a file; FileNotFoundError when it is not there, StorageError when
    it cannot be read, both naming ``location``."""
    if is_local(location):
        try:
            return Path(location).read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"{location}: no such file") from None
    stream = open_stream(location)
    try:
        with stream:
            return stream.read()
    except Exception as err:
        raise StorageError(f"{location}: {_why(err, stream)}") from err


def open_stream(location: str) -> IO[bytes]:
    """A binary stream of a shard or manifest (see the module docstring for who opens what)."""
    if is_local(location):
        try:
            return open(location, "rb")  # noqa: SIM115 (the caller closes it)
        except FileNotFoundError:
            raise FileNotFoundError(f"{location}: no such file") from None
    try:
        if location.startswith(PIPE):
            return wds.gopen(location, "rb")
        protocol = fsspec.utils.get_protocol(location)
        return fsspec.open(location, "rb", **_OPEN_OPTIONS.get(protocol, {})).open()
    except FileNotFoundError as err:
        # fsspec's HTTP reports any failure to learn a file's size as FileNotFoundError
        cause = err.__cause__
        if cause is None or getattr(cause, "status", None) == 404:
            raise FileNotFoundError(f"{location}: not found") from None
        raise StorageError(f"{location}: {_why(cause)}") from err
    except Exception as err:
        raise StorageError(f"{location}: {_why(err)}") from err


def _why(err: BaseException, stream: Any = None) -> str:
    """What went wrong, in words: the HTTP status or the command's exit status where there is
    one (WebDataset's pipe error repeats the whole command line)."""
    status = getattr(err, "status", None)
    if isinstance(status, int):
        return f"HTTP {status} {getattr(err, 'message', '')}".rstrip()
    exit_status = stream.proc.poll() if isinstance(stream, Pipe) else None
    if exit_status:
        return f"the command exited with status {exit_status}"
    if isinstance(err, ImportError):  # fsspec names the package a protocol needs
        return str(err)
    # WebDataset appends the stream and URL to an error's args, and " @ <file>" to its message
    wrapped = len(err.args) > 1 and isinstance(err.args[0], str)
    text = err.args[0].split(" @ ")[0] if wrapped else str(err)
    return f"{type(err).__name__}: {text}"


class ShardReporter(Protocol):
    """Where ``tar_samples`` reports a bad shard (``bita.data.skips.SkipLog`` is one)."""

    def shard(self, url: str, reason: str) -> None: ...


def tar_samples(
    sources: Iterable[dict],
    *,
    report: ShardReporter,
    select_files: Callable[[str], bool] | None = None,
) -> Iterator[dict]:
    """Samples (``__key__``, ``__url__`` and one entry per member) of the shards
    ``{"url": location}`` in turn, as ``wds.tarfile_to_samples`` gives them, but opened as
    above. A shard that cannot be opened, or whose tar breaks off, is reported with its
    location (``report.shard``) and the rest of it skipped."""
    for source in sources:
        url = source["url"]
        try:
            stream = open_stream(url)
        except OSError as err:
            why = str(err).removeprefix(f"{url}: ")
            report.shard(url, f"cannot be opened ({why}); its samples are skipped")
            continue
        handler = _shard_handler(report, url, stream)
        read_to_the_end = False
        try:
            opened = [{"url": url, "stream": stream}]
            files = tar_file_expander(opened, handler=handler, select_files=select_files)
            yield from group_by_keys(files, handler=handler)
            read_to_the_end = True
        finally:
            try:
                stream.close()  # a pipe: command that failed says so here
            except Exception as err:
                if read_to_the_end:  # else the reader stopped early and the command got SIGPIPE
                    handler(err)


def _shard_handler(report: ShardReporter, url: str, stream: Any) -> Callable[..., bool]:
    """A WebDataset ``handler=``: report the error against the shard and go on."""

    def handle(err: BaseException) -> bool:
        report.shard(
            url,
            f"breaks off ({_why(err, stream)}): truncated, damaged or cut off in transfer; "
            "the samples after that point are skipped",
        )
        return True

    return handle
