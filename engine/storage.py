"""Atomic file writes, the project's one way to put a file on disk: a hidden temp file in the target folder,
synced, then renamed onto the final name, so a reader never sees half a file and a failure leaves the old one.

Files get the mode the umask allows (like open() would), so a server running as another user can read them.
A failed write raises WriteError, one line that names the file and says what to do (disk full, read-only).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from engine.errors import EngineError


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_read_umask()  # read once: os.umask can only be read by setting it
DIR_MODE = 0o777 & ~_read_umask()


def file_version(path: str | Path) -> tuple[str, int, int, int]:
    """What tells one version of a file from the next (path, mtime in ns, size, inode): the one key every cache of
    something read from a file uses to notice a rewrite (an atomic write changes the inode); OSError if it is gone."""
    stat = Path(path).stat()
    return str(path), stat.st_mtime_ns, stat.st_size, stat.st_ino


class WriteError(EngineError, OSError):
    """A file could not be written; str() is the one-line message for the user, errno the cause."""


def write_error(path: Path, err: OSError) -> WriteError:
    """The user-facing error for a failed write of `path` (its errno kept)."""
    if isinstance(err, WriteError):
        return err
    if err.errno == errno.ENOSPC:
        hint = "the disk is full; free some space and try again"
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "the folder is read-only; make it writable or use a writable folder"
    elif err.errno == errno.EFBIG:
        hint = "the file is larger than this system allows (ulimit -f); raise the limit or free space"
    else:
        hint = "check that the folder exists, is writable and has free space"
    cause = (err.strerror or str(err)).lower()
    result = WriteError(f"{cause} while writing {path}; {hint}")
    result.errno = err.errno
    return result


@contextmanager
def staged_file(final: str | Path) -> Iterator[Path]:
    """A hidden temp path next to `final` for a writer that needs a path; removed on exit unless commit()ed.

    A folder it had to create is removed again if it ends empty (a job stopped half-way leaves nothing).
    """
    final = Path(final)
    created = not final.parent.is_dir()
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.stem}.", suffix=f"{final.suffix}.tmp")
        os.fchmod(fd, FILE_MODE)  # mkstemp makes owner-only files
        os.close(fd)
    except OSError as err:
        raise write_error(final, err) from err
    tmp = Path(name)
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)
        if created:
            try:
                final.parent.rmdir()  # only if empty
            except OSError:
                pass


def write_staged(tmp: Path, data: bytes, final: Path, durable: bool = True) -> None:
    """Write and (if durable) sync bytes to a staged temp path; a failure names `final`."""
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
    except OSError as err:
        raise write_error(final, err) from err


def commit(tmp: Path, final: str | Path) -> None:
    """Rename a staged (written and synced) file onto its final path (atomic on one file system)."""
    try:
        os.replace(tmp, final)
    except OSError as err:
        raise write_error(Path(final), err) from err


def atomic_write_bytes(path: str | Path, data: bytes, durable: bool = True) -> Path:
    """Write bytes to path atomically.

    durable=False skips the fsync: still never a half-written file, but a power cut may lose it. Bulk
    writers (the generator) use it and write their manifest, durably, last.
    """
    path = Path(path)
    with staged_file(path) as tmp:
        write_staged(tmp, data, path, durable)
        commit(tmp, path)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write text (UTF-8) atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write an object as indented JSON atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


class Reserve:
    """A ballast file that holds a little disk space for a job's last record: a job that hits a full disk releases
    it, so the record of why it stopped can still be written (run.json, the registry's log).

    Best effort: where the space cannot be taken (a disk already full, a read-only folder) there is no reserve.
    """

    SIZE = 1 << 20  # run.json's temp copy plus SQLite's journal pages, with room to spare

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / ".reserve"
        self._created_folder = not Path(folder).exists()

    def __enter__(self) -> Reserve:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "wb") as handle:
                try:
                    os.posix_fallocate(handle.fileno(), 0, self.SIZE)  # really allocated, not a sparse file
                except (AttributeError, OSError):
                    handle.write(b"\0" * self.SIZE)
        except OSError:
            self.release()
        return self

    def release(self) -> None:
        """Give the space back (idempotent)."""
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass

    def __exit__(self, *exc: object) -> None:
        self.release()
        if self._created_folder:
            try:
                self.path.parent.rmdir()  # a job that failed before writing anything leaves no empty folder
            except OSError:
                pass


@contextmanager
def staged_folder(final: str | Path) -> Iterator[Path]:
    """A hidden temp folder next to `final` to build a whole folder in; removed on exit unless replace_folder()
    moved it into place, so a failure (a full disk, an interrupt) leaves `final` as it was."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
        os.chmod(tmp, DIR_MODE)  # mkdtemp's 0700 would hide the set from other users
    except OSError as err:
        raise write_error(final, err) from err
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_folder(tmp: Path, final: str | Path) -> None:
    """Move a staged folder onto `final`, replacing a folder there (the old one is removed after the swap)."""
    final = Path(final)
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    try:
        if final.exists():
            os.rename(final, old)
        os.rename(tmp, final)
    except OSError as err:
        if old.exists() and not final.exists():
            os.rename(old, final)  # put the old folder back
        raise write_error(final, err) from err
    shutil.rmtree(old, ignore_errors=True)


def check_replaceable(out: Path, columns: tuple[str, ...], command: str) -> None:
    """Refuse a dataset --out that holds anything but a set `command` wrote earlier (one whose manifest has these
    columns), which is then replaced whole: a folder of the user's own images is never written into."""
    if not out.exists():
        return
    if not out.is_dir():
        raise EngineError(f"{out} is a file; give a folder for the dataset")
    try:
        entries = list(out.iterdir())
        manifest = out / "manifest.csv"
        header = manifest.read_text(encoding="utf-8").splitlines()[:1] if manifest.is_file() else []
    except (OSError, UnicodeDecodeError) as err:
        raise EngineError(f"cannot read the output folder {out}: {err}") from err
    if entries and header != [",".join(columns)]:
        raise EngineError(f"{out} already holds files that `{command}` did not write (a dataset of yours?); nothing "
                          "was changed: choose a new or empty folder")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


@contextmanager
def folder_lock(folder: str | Path, doing: str) -> Iterator[Path]:
    """Hold `.<name>.lock` beside a dataset folder while `doing` it (importing, labelling): a second writer, in this
    process or another, is refused with one line instead of writing half into it. A lock left by a process that
    died is taken over."""
    folder = Path(folder)
    lock = folder.parent / f".{folder.name}.lock"
    for _ in range(2):
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, FILE_MODE)
        except FileExistsError:
            holder = lock.read_text(errors="replace").split() if lock.is_file() else []
            pid = int(holder[0]) if holder and holder[0].isdigit() else 0
            if not pid or _alive(pid):  # no pid yet: its holder is between creating and filling it
                what = " ".join(holder[1:]) or "written"
                raise EngineError(f"{folder} is being {what} by process {pid or '?'}; nothing was written: try again "
                                  f"when it has finished (or remove {lock.name} if no process writes there)")
            lock.unlink(missing_ok=True)  # its holder died: take it over
            continue
        except OSError as err:
            raise write_error(lock, err) from err
        with os.fdopen(fd, "w") as handle:
            handle.write(f"{os.getpid()} {doing}\n")
        break
    else:
        raise EngineError(f"{folder} is locked by {lock} and it cannot be taken over; remove it if no one writes there")
    try:
        yield lock
    finally:
        lock.unlink(missing_ok=True)
