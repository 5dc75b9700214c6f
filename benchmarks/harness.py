"""Small benchmark harness shared by ``benchmarks/bench_*.py``.

* :func:`env_info` — device, torch / triton / CUDA versions, commit, date: every CSV row carries it.
* :func:`time_fn` — median, p20 and p80 of wall time (CUDA-synchronised on GPU).
* :func:`peak_memory` — extra peak memory of a call beyond what was live before it: the CUDA caching
  allocator's peak on GPU; on CPU a ``TorchDispatchMode`` that tracks every tensor storage created
  inside the call until it is freed (so it counts tensors saved for backward, not Python objects).
* :func:`write_csv` — append rows to ``<results>/<bench>/<device>_<date>_<sha>.csv``, the one writer
  of results: long format (one row per case and quantity), one unit per quantity (see below).
* :func:`save_results` — :func:`write_csv`, print the path, and :func:`record` it on ``--record``.
* :func:`add_record_arg` / :func:`record` — ``--record``: name a run's CSV as its benchmark's headline
  in ``bench_results/manifest.json``, the runs ``benchmarks/report.py`` puts in the README.

A comparison is a ratio measured in one process run; absolute times only mean something on the
device that produced them.

Results CSV: the columns ``device, torch, triton, cuda, commit, date`` (:func:`env_info`), then the
benchmark's case columns (what was run: provider, batch size, ...), then ``quantity, value``. A
quantity's name ends in its unit: times in milliseconds (``median_ms``, ``t_loss_ms``), memory and
bytes on the wire in bytes (``peak_mem_bytes``, ``wire_bytes``); rates say so (``samples_per_s``,
``eff_tflops``) and ratios, errors and counts have no unit. A row given in seconds (``_s``), MiB
(``_mib``) or MB (``_mb``) is converted here, so every CSV holds one unit per quantity.
``benchmarks/report.py`` reads the format back into one row per case.
"""
from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import statistics
import subprocess
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench_results"
LONG_COLUMNS = ("quantity", "value")
# a unit word in a quantity's name → (the one unit it is stored in, factor)
TO_STORED_UNIT = {"s": ("ms", 1e3), "mib": ("bytes", 2 ** 20), "mb": ("bytes", 1e6)}


def _git_sha() -> str:
    """The commit the results belong to: $COSMOS_BENCH_COMMIT if set (for copies of the tree whose .git
    is stale, such as a lent GPU machine's), else HEAD's short sha, with "+dirty" when tracked files
    differ from HEAD."""
    if os.environ.get("COSMOS_BENCH_COMMIT"):
        return os.environ["COSMOS_BENCH_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=REPO, capture_output=True).returncode
        return sha + ("+dirty" if dirty == 1 else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "-")
    return f"cpu-{platform.machine()}-{torch.get_num_threads()}threads"


def env_info(device: torch.device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {"device": device_name(device), "torch": torch.__version__, "triton": triton_version,
            "cuda": torch.version.cuda or "none", "commit": _git_sha(),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, device: torch.device, warmup: int = 2, reps: int = 5, setup=None) -> dict:
    """Time ``fn()`` (or ``fn(setup())`` when ``setup`` is given; setup is not timed)."""
    def call():
        if setup is None:
            fn()
            return 0.0
        arg = setup()
        _sync(device)
        t0 = time.perf_counter()
        fn(arg)
        _sync(device)
        return time.perf_counter() - t0

    for _ in range(warmup):
        call()
    _sync(device)
    times = []
    for _ in range(reps):
        if setup is None:
            t0 = time.perf_counter()
            call()
            _sync(device)
            times.append(time.perf_counter() - t0)
        else:
            times.append(call())
    times.sort()

    def pct(f):    # nearest-rank percentile: always one of the measured times
        return times[min(len(times) - 1, round(f * (len(times) - 1)))]

    return {"median_s": statistics.median(times), "p20_s": pct(0.2), "p80_s": pct(0.8)}


class _CPUPeak(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen = set()

    def _track(self, t):
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
            return
        st = t.untyped_storage()
        key = st.data_ptr()
        if key in self._seen or st.nbytes() == 0:
            return
        self._seen.add(key)
        self.live += st.nbytes()
        self.peak = max(self.peak, self.live)
        nbytes = st.nbytes()

        def release(key=key, nbytes=nbytes, mode=weakref.ref(self)):
            m = mode()
            if m is not None and key in m._seen:
                m._seen.discard(key)
                m.live -= nbytes
        weakref.finalize(t, release)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # outputs that share storage with an input (views, in-place ops) allocate nothing new
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs or {}))[0]
                  if isinstance(t, torch.Tensor) and t.device.type == "cpu"}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self._track(t)
        return out


def peak_memory(fn, device: torch.device, setup=None) -> int:
    """Extra peak bytes allocated while ``fn()`` (or ``fn(setup())``) runs, beyond what was live
    before it (setup's allocations are not counted)."""
    arg = setup() if setup is not None else None
    run = (lambda: fn(arg)) if setup is not None else fn
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    with _CPUPeak() as mode:
        run()
    return mode.peak


def stored_quantity(name: str, value):
    """(name, value) in the unit results are stored in: ``median_s`` 0.5 → ``median_ms`` 500.0,
    ``peak_mib`` 2.0 → ``peak_bytes`` 2097152, ``wire_mb_x`` → ``wire_bytes_x``; rates (``_per_s``) and
    names without a unit word are returned as they are, and so is an empty value (not measured)."""
    words = name.split("_")
    for i, word in enumerate(words):
        if word in TO_STORED_UNIT and not (word == "s" and i and words[i - 1] == "per"):
            unit, factor = TO_STORED_UNIT[word]
            if value not in ("", None):
                value = float(value) * factor
                if unit == "bytes" and value.is_integer():
                    value = int(value)
            return "_".join(words[:i] + [unit] + words[i + 1:]), value
    return name, value


def long_rows(rows: list[dict], case: tuple[str, ...], env: tuple[str, ...]) -> list[dict]:
    """Wide rows (one per case: ``env`` and ``case`` columns plus quantities) → one row per case and
    quantity, in the stored unit; a quantity absent from a row but present in another is written
    empty, as a wide table would hold it."""
    quantities = []
    for r in rows:
        quantities += [k for k in r if k not in env and k not in case and k not in quantities]
    out = []
    for r in rows:
        head = {k: r.get(k, "") for k in (*env, *case)}
        for q in quantities:
            name, value = stored_quantity(q, r.get(q, ""))
            out.append({**head, "quantity": name, "value": value})
    return out


def write_csv(bench: str, rows: list[dict], device: torch.device, *, case: tuple[str, ...],
              root: Path | None = None) -> Path:
    """Append ``rows`` (one dict per case: the ``case`` columns and the measured quantities) to
    ``root/<bench>/<device>_<date>_<sha>.csv`` in the long format of the module docstring; ``root``
    defaults to ``bench_results/``. A file of the same name with other columns is not appended to: the
    rows go to a new file with a time stamp in its name."""
    info = env_info(device)
    out = Path(root or RESULTS) / bench / f"{info['device']}_{info['date']}_{info['commit']}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    fields = [*info, *case, *LONG_COLUMNS]
    new = not out.exists()
    if not new:
        with open(out, newline="") as fh:
            header = next(csv.reader(fh), None)
        if header != fields:
            out = out.with_name(out.stem + f"_{int(time.time())}.csv")
            new = True
    with open(out, "a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        if new:
            w.writeheader()
        w.writerows(long_rows([{**info, **r} for r in rows], tuple(case), tuple(info)))
    return out


def save_results(bench: str, rows: list[dict], device: torch.device, *, case: tuple[str, ...], record_run: bool = False,
                 root: Path | None = None) -> Path:
    """:func:`write_csv`, say where, and with ``record_run`` (a benchmark's ``--record``) :func:`record` it."""
    out = write_csv(bench, rows, device, case=case, root=root)
    print(f"\nwrote {out}")
    if record_run:
        record(out)
    return out


MANIFEST = "manifest.json"


def add_record_arg(ap) -> None:
    """``--record``: this run's CSV becomes the headline its benchmark shows in bench_results/README.md."""
    ap.add_argument("--record", action="store_true",
                    help=f"mark this run's CSV as the headline for its benchmark and device in "
                         f"bench_results/{MANIFEST} (benchmarks/report.py shows headline runs only)")


def record(csv_path: Path) -> Path:
    """Name ``csv_path`` (``<root>/<bench>/<device>_<date>_<sha>.csv``) as the headline of its benchmark
    and device in ``<root>/manifest.json``, so report.py shows this run and not merely the newest CSV."""
    import json

    csv_path = Path(csv_path).resolve()
    root, bench = csv_path.parents[1], csv_path.parent.name
    with open(csv_path, newline="") as fh:
        device = next(csv.DictReader(fh))["device"]
    path = root / MANIFEST
    data = json.loads(path.read_text()) if path.exists() else {}
    data.setdefault("headline", {}).setdefault(bench, {})[device] = csv_path.relative_to(root).as_posix()
    data["headline"] = {b: dict(sorted(d.items())) for b, d in sorted(data["headline"].items())}
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    print(f"recorded {csv_path.relative_to(root).as_posix()} as the {bench} headline for {device} in {path}")
    return path
