"""A process killed without warning (SIGKILL, the OOM killer) leaves no helper process behind.

A trainer (or a small script) runs in a subprocess; once its helpers are up, every descendant
(fork server, data-loader workers, process-pool workers, resource tracker) is noted, the process is
SIGKILLed, and each of them must be gone within 10 s. Linux only: processes are found in /proc.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cosmos_fast.data import lifeline
from cosmos_fast.data.synthetic import write_demo_data

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc and prctl (Linux)")

REPO = Path(__file__).resolve().parents[1]


def _stat(pid: int):
    """(ppid, start time, state) of a live process, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text.rsplit(")", 1)[1].split()          # after "pid (comm)", which may hold spaces
    return int(fields[1]), int(fields[19]), fields[0]


def _descendants(root: int) -> dict[int, int]:
    """{pid: start time} of every live descendant of root."""
    children: dict[int, list[int]] = {}
    starts = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) is not None and st[2] != "Z":
            children.setdefault(st[0], []).append(int(entry))
            starts[int(entry)] = st[1]
    found, todo = {}, [root]
    while todo:
        for pid in children.get(todo.pop(), []):
            found[pid] = starts[pid]
            todo.append(pid)
    return found


def _alive(pid: int, start: int) -> bool:
    st = _stat(pid)
    return st is not None and st[1] == start and st[2] != "Z"   # same process, not a zombie


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:160]
    except OSError:
        return "?"


def test_die_with_parent_arms_or_exits_when_the_owner_is_gone(monkeypatch):
    gone = subprocess.Popen(["true"])
    gone.wait()
    for owner, status in ((os.getpid(), 0), (gone.pid, 1)):
        child = os.fork()
        if child == 0:
            try:
                os._exit(0 if lifeline.die_with_parent(owner) else 2)
            finally:
                os._exit(3)
        assert os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) == status, owner
    monkeypatch.setattr(sys, "platform", "darwin")
    assert lifeline.die_with_parent(gone.pid) is False         # elsewhere: nothing armed, nothing ended


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_demo_data(tmp_path_factory.mktemp("demo"), n_train=128, n_val=32, samples_per_shard=32, seed=1)


def _kill_and_check(proc: subprocess.Popen, ready, stderr: Path, min_procs: int) -> dict[int, str]:
    """Wait until ready() and proc has min_procs descendants, SIGKILL proc; the descendants still
    alive 10 s later, {pid: command line}. proc must lead its own session (cleaned up here)."""
    try:
        deadline, procs = time.monotonic() + 150, {}
        while time.monotonic() < deadline and proc.poll() is None:
            if ready() and len(procs := _descendants(proc.pid)) >= min_procs:
                break
            time.sleep(0.2)
        assert proc.poll() is None, stderr.read_text()[-3000:]
        assert len(procs) >= min_procs, f"helpers never came up: {[_cmdline(p) for p in procs]}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(p, s) for p, s in procs.items()):
            time.sleep(0.1)
        return {p: _cmdline(p) for p, s in procs.items() if _alive(p, s)}
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)      # whatever is left, so no test run leaks it
        except ProcessLookupError:
            pass
        proc.wait(10)


def test_sigkill_of_trainer_leaves_no_process_behind(data, tmp_path):
    """The default start (forkserver): fork server, 2 workers (children of the server), tracker."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "cosmos_fast.train", "--config", "tiny-cpu", "--output-dir", str(out),
           f"data.train_shards={data['train']}", f"data.val_shards={data['val']}", "data.num_workers=2",
           "data.batch_size=8", "data.global_size=32", "data.local_size=16", "data.train_num_samples=128",
           "data.shuffle_buffer=32", "data.shuffle_initial=8", "optim.epochs=1000", "train.progress=false",
           "train.tensorboard=false", "train.save_every_steps=100000"]
    metrics = out / "metrics.jsonl"
    with open(tmp_path / "stderr.txt", "w") as err:
        trainer = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=err)
    # ready: a step has run, so both workers have served a batch
    left = _kill_and_check(trainer, lambda: metrics.is_file() and metrics.read_text().strip() != "",
                           tmp_path / "stderr.txt", min_procs=4)
    assert not left, f"still alive 10 s after the trainer's SIGKILL: {left}"


_HELPERS = """
import json
import sys
import types

import torch
from cosmos_fast.data.dali_loader import DaliWebDatasetLoader
from cosmos_fast.data.torchvision_loader import worker_loader_kwargs
from tests.test_loader import spec

# the DALI backend's caption pool, without building a DALI pipeline (its code needs no DALI)
dali = types.SimpleNamespace(spec=spec([]), caption_workers=1, _pool=None)
meta = json.dumps({"caption": "a red square. a blue sky."}).encode()
DaliWebDatasetLoader._captions(dali, [meta], [0])
iters = []
for method in ("spawn", "fork"):
    dl = torch.utils.data.DataLoader(range(100), batch_size=1, num_workers=1, **worker_loader_kwargs(1, method))
    iters.append(iter(dl))
    next(iters[-1])
print("up", flush=True)
sys.stdin.read()
"""


def test_sigkill_leaves_no_spawn_fork_or_caption_pool_worker(tmp_path):
    """Helpers whose parent is the killed process: DataLoader workers started by spawn and by fork
    (torch's watchdog alone does not end them in time), the DALI backend's caption-worker pool."""
    with open(tmp_path / "stderr.txt", "w") as err:       # stdin: ends the script if the test dies
        proc = subprocess.Popen([sys.executable, "-c", _HELPERS], cwd=REPO, start_new_session=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
    os.set_blocking(proc.stdout.fileno(), False)
    seen = []

    def ready():
        seen.append(proc.stdout.read() or b"")
        return b"up" in b"".join(seen)

    # a spawn worker, a fork worker, a pool worker, the resource tracker
    left = _kill_and_check(proc, ready, tmp_path / "stderr.txt", min_procs=4)
    proc.stdin.close()
    proc.stdout.close()
    assert not left, f"still alive 10 s after the SIGKILL: {left}"
