"""The daemon's listening socket file, failing closed: a folder only root or the daemon's user
controls, a stale socket replaced only when the kernel says nobody listens on it, and mode
0660 from the moment the file exists (bound under a umask, not chmod-ed after)."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

from apreqeld.errors import DaemonError, InputError

SOCKET_MODE = 0o660
DIR_MODE = 0o750
PROBE_TIMEOUT_S = 2.0


def secure_dir(folder: Path, /, *, euid: int | None = None) -> None:
    """Check `folder` and every folder above it, creating the missing ones (mode 0750) only
    below a checked one: each must be owned by root or `euid`, and none writable by group or
    others, except an ancestor with the sticky bit (/tmp). InputError says which and why."""
    euid = os.geteuid() if euid is None else euid
    missing = []
    p = Path(folder)
    while not p.exists() and not p.is_symlink():
        missing.append(p)
        p = p.parent
    _check_chain(p, euid, final=not missing)
    for d in reversed(missing):
        try:
            os.mkdir(d, DIR_MODE)
        except FileExistsError:
            pass  # made meanwhile by someone: checked below like any other
        except OSError as exc:
            raise InputError(f"cannot create {d}: {exc.strerror}") from None
    _check_chain(Path(folder), euid, final=True)


def _check_chain(folder: Path, euid: int, *, final: bool) -> None:
    real = Path(os.path.realpath(folder))
    for d in [real, *real.parents]:
        try:
            st = os.stat(d)
        except OSError as exc:
            raise InputError(f"cannot check {d}: {exc.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise InputError(f"refusing the socket folder {d}: not a directory")
        if st.st_uid not in (0, euid):
            raise InputError(f"refusing the socket folder {d}: owned by uid {st.st_uid}, not "
                             f"by this user ({euid}) or root")
        writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if writable and ((final and d == real) or not st.st_mode & stat.S_ISVTX):
            who = "others" if st.st_mode & stat.S_IWOTH else "its group"
            raise InputError(f"refusing the socket folder {d}: writable by {who} "
                             f"(mode {stat.S_IMODE(st.st_mode):04o})")


def remove_stale(path: Path, /) -> None:
    """Unlink `path` if it is a socket nobody listens on; refuse anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise InputError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(PROBE_TIMEOUT_S)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        path.unlink(missing_ok=True)  # stale: the kernel says nobody listens
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise InputError(f"cannot tell whether {path} is in use ({exc.strerror or exc}); "
                         "refusing to replace it") from None
    else:
        raise DaemonError(f"another daemon is listening on {path}")
    finally:
        probe.close()


def bind_socket(path: Path, /, *, backlog: int = 256) -> socket.socket:
    """A listening Unix socket at `path`, mode 0660 from its creation, in a checked folder."""
    path = Path(path)
    secure_dir(path.parent)
    remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777 & ~SOCKET_MODE)  # bind creates the file 0777 & ~umask
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise InputError(f"cannot listen on {path}: {exc.strerror}") from None
    finally:
        os.umask(old)
    os.chmod(path, SOCKET_MODE)  # exactly 0660, whatever umask this process started with
    sock.listen(backlog)
    return sock
