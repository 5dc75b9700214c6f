"""Helper processes end with the process that started them, even when it is SIGKILLed.

When the trainer dies without running any cleanup (SIGKILL, the OOM killer), nothing tells its
data-loader workers. torch's worker watchdog compares ``os.getppid()`` with the pid the worker
started under, which never changes for a ``forkserver`` worker: its parent is the fork server, and
the fork server waits for an EOF that the workers themselves hold open; a ``concurrent.futures``
worker blocks on its call queue. All of them, and the resource tracker, would live on.

On Linux a process can ask the kernel to SIGKILL it when its parent dies
(``prctl(PR_SET_PDEATHSIG)``). The chain:

* the fork server arms it while it preloads its modules (this module is first in
  :func:`~cosmos_fast.data.torchvision_loader.worker_context`'s preload list and arms itself when imported
  there), so it dies with the process that started it;
* every data-loader worker arms it in its ``worker_init_fn`` and so dies with its parent: the fork
  server (``forkserver``) or the trainer itself (``spawn``, ``fork``); a process pool passes
  :func:`die_with_parent` as its ``initializer``;
* the resource tracker needs nothing: it exits once every process holding its pipe is gone.

SIGKILL, not SIGTERM: a ``fork`` worker inherits the trainer's SIGTERM handler (which only asks
for a checkpoint), and a worker holds nothing that needs a graceful exit.

Limits. The kernel signals when the parent *thread* that started the child ends, not the parent
process: start loaders from a thread that outlives them (this package iterates them on the main
thread; a dead fork server is restarted by multiprocessing on the next use). Elsewhere than Linux
nothing is armed and torch's watchdog is the only guard.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1          # <linux/prctl.h>


def _gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie, not yet reaped by its parent, counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in "ZX"
    except FileNotFoundError:
        return True
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    return False


def die_with_parent(owner: int | None = None) -> bool:
    """Have the kernel SIGKILL this process when its parent exits; whether that could be armed.

    owner: the pid this process must not outlive (the trainer). The signal only follows deaths
    after this call, so when ``owner`` is already gone the process exits here (status 1).
    Does nothing and returns False where ``prctl`` is not available (non-Linux).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        armed = libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False
    if owner is not None and _gone(owner):
        os._exit(1)
    return armed


def _preloaded_by_forkserver() -> bool:
    """Whether this import runs inside multiprocessing's fork server, preloading its modules."""
    server = sys.modules.get("multiprocessing.forkserver")
    if server is None:
        return False
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is server.main.__code__:
            return True
        frame = frame.f_back
    return False


if _preloaded_by_forkserver():
    # The fork server's parent is the process that started it. If that one is gone already, the
    # server sees its "alive" pipe closed once the preload is done and exits by itself.
    die_with_parent()
