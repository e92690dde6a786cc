"""Files a sweep rewrites in one step, and the lock that keeps a second
invocation out of a sweep being written. Imported by runs, resume,
start, cli and the reporting modules; it imports only the standard
library."""

import contextlib
import fcntl
import os
from pathlib import Path


def replace(path, write):
    """Write a file in one step: write(partial) fills a temporary file in
    the same folder, which then replaces `path`. A signal or a full disk
    on the way leaves the old file whole and no temporary file behind."""
    partial = f"{path}.partial"
    try:
        write(partial)
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise


def replace_text(path, text):
    replace(path, lambda partial: Path(partial).write_text(text))


class SweepLocked(Exception):
    """Another invocation is writing this sweep."""


class SweepLock:
    """X.csv.lock beside a sweep's CSV, held while an invocation writes
    the sweep: an flock, which the kernel drops however its holder ends
    (SIGKILL too), with the holder's PID inside for the message."""

    def __init__(self, csv_path):
        self.path = Path(f"{csv_path}.lock")
        self.fd = None

    def acquire(self):
        """Retried where a holder that ended removed the file after it
        was opened here: the file that is there now is the one to lock."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise SweepLocked(f"{self.path.with_suffix('')} is being written by another "
                                  f"invocation (PID {holder}); wait for it to end, then "
                                  "--resume") from None
            with contextlib.suppress(FileNotFoundError):
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def release(self):
        """Removed while still held, so that nobody locks a file that is
        about to go."""
        if self.fd is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            os.close(self.fd)
            self.fd = None
