"""One rank of a W-rank COSMOS run in one process, without torch.distributed (for bench_rank.py).

The two loss modules, :mod:`cosmos_fast.ops.contrastive` and :mod:`cosmos_fast.reference.contrastive`,
reach torch.distributed only through their module-level name ``dist``. Inside
``SimWorld.active()`` that name is a :class:`SimDist` bound to the simulated world, and it is
restored on exit; nothing in the package is edited. The losses then run their W-rank code as they
would under a real launcher: world() says (W, r), the features are gathered, the column statistics
all-reduced, the gradients of gathered student features reduce-scattered back to their owner.

The other W − 1 ranks exist as fixed feature blocks, ``peers``: for each feature argument of the
loss (``s_image_features``, ``s_text_features``, ``t_image_features``, ``t_text_features``,
``s_img_crossmodal_features``, ``s_txt_crossmodal_features``) a (W, rows, D) tensor holding every
rank's (n·B, D) block; slot r is this rank's and is never read. The loss must be called through
:class:`SimLoss`, which tells the world which tensors are which argument.

Modes
  stand-in (``active()``; the timed steps). This thread is rank r. A gather returns the peers'
      rows of the argument being gathered around this rank's own slot: exact, so a path whose
      only collectives are gathers (the official loss) computes exactly what rank r computes in a
      real run. A reduction (all_reduce, reduce_scatter) returns this rank's own part: the work
      of the rank is unchanged, but the fast loss's cross-rank statistics (and the loss value it
      returns) are then rank r's share only; what the reductions would move is counted.
  lockstep (``active(lockstep=True)``; the equality checks). When the loss is called, the other
      W − 1 ranks start as threads that call the same loss on their peer blocks (student blocks
      and both logit scales as leaves with gradients, teacher blocks without), in the same grad
      and autocast mode, and then run its backward. Collectives meet at a barrier and combine
      the W ranks' tensors in rank order, so rank r's loss and gradients are those of a real
      W-rank run. Forward and backward on CPU; forward only on CUDA (the autograd engine runs
      CUDA backward on one device thread shared by all Python threads, where one rank's
      collective waiting for another's would deadlock).

Accounting: each collective of this rank is counted (calls per op and bytes on the wire per rank,
ring algorithms: all-gather (W−1)·|x|, all-reduce 2(W−1)/W·|x|, reduce-scatter (W−1)/W·|input|).
"""
from __future__ import annotations

import contextlib
import threading
from collections import Counter

import torch
import torch.distributed as torch_dist

from cosmos_fast.ops import contrastive as fast_loss_module
from cosmos_fast.reference import contrastive as reference_loss_module

LOSS_MODULES = (fast_loss_module, reference_loss_module)
FEATURE_ARGS = ("s_image_features", "s_text_features", "t_image_features", "t_text_features",
                "s_img_crossmodal_features", "s_txt_crossmodal_features")
STUDENT_ARGS = ("s_image_features", "s_text_features", "s_img_crossmodal_features", "s_txt_crossmodal_features")
BARRIER_TIMEOUT_S = 120.0
_ACTIVE: list = []               # the world inside active(), if any


class _Done:
    """The handle of an ``async_op=True`` collective: already complete."""

    def wait(self, timeout=None):
        return True

    def is_completed(self):
        return True


class SimDist:
    """The part of the torch.distributed API the loss modules call, served by a :class:`SimWorld`.
    Any other attribute raises, naming itself, so a loss that starts calling a new collective
    fails loudly here instead of silently running unsimulated."""

    ReduceOp = torch_dist.ReduceOp

    def __init__(self, world: "SimWorld"):
        self._world = world

    def __getattr__(self, name):
        raise AttributeError(f"benchmarks/rank_sim.py: the simulated world does not implement torch.distributed.{name}")

    def is_available(self):
        return True

    def is_initialized(self):
        return True

    def get_world_size(self, group=None):
        return self._world.world

    def get_rank(self, group=None):
        return self._world.thread_rank()

    def get_backend(self, group=None):
        return self._world.backend

    def all_gather(self, tensor_list, tensor, group=None, async_op=False):
        out = self._world.gather(tensor)
        for i, part in enumerate(out.chunk(self._world.world)):
            tensor_list[i].copy_(part)
        return _Done() if async_op else None

    def all_gather_into_tensor(self, output_tensor, input_tensor, group=None, async_op=False):
        output_tensor.copy_(self._world.gather(input_tensor))
        return _Done() if async_op else None

    def all_reduce(self, tensor, op=torch_dist.ReduceOp.SUM, group=None, async_op=False):
        self._world.reduce(tensor, op)
        return _Done() if async_op else None

    def reduce_scatter_tensor(self, output, input, op=torch_dist.ReduceOp.SUM, group=None, async_op=False):
        self._world.reduce_scatter(output, input, op)
        return _Done() if async_op else None


class SimWorld:
    """Rank ``rank`` of ``world`` ranks; ``peers`` maps each feature argument name to a (W, rows, D)
    tensor of every rank's block (slot ``rank`` unused); ``backend`` is what get_backend() says
    ("nccl": the losses use all_gather_into_tensor / reduce_scatter_tensor, as on GPUs)."""

    def __init__(self, world: int, rank: int, peers: dict, backend: str = "gloo"):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside a world of {world}")
        missing = [k for k in FEATURE_ARGS if k not in peers]
        if missing:
            raise ValueError(f"peers lacks {missing}")
        for k, v in peers.items():
            if v.dim() != 3 or v.shape[0] != world:
                raise ValueError(f"peers[{k!r}] must be (W={world}, rows, D), got {tuple(v.shape)}")
        self.world, self.rank, self.peers, self.backend = world, rank, peers, backend
        self.lockstep = False
        self.calls: Counter = Counter()          # this rank's collectives: calls per op
        self.wire_bytes: Counter = Counter()     # and bytes on the wire per rank, per op
        self._tls = threading.local()
        self._cast: dict = {}
        self._threads: list = []
        self._errors: list = []

    # ---------------------------------------------------------------- entering the world
    @contextlib.contextmanager
    def active(self, lockstep: bool = False):
        """Route the loss modules' ``dist`` to this world (``lockstep``: see the module docstring)."""
        if _ACTIVE:
            raise RuntimeError("a simulated world is already active")
        saved = [m.dist for m in LOSS_MODULES]
        fake = SimDist(self)
        self.lockstep, self._errors, self._threads = lockstep, [], []
        if lockstep:
            self._barrier = threading.Barrier(self.world, action=self._combine, timeout=BARRIER_TIMEOUT_S)
            self._slots = [None] * self.world
        self._tls.rank = self.rank
        for m in LOSS_MODULES:
            m.dist = fake
        _ACTIVE.append(self)
        try:
            yield self
            self._join()
        finally:
            _ACTIVE.clear()
            for m, d in zip(LOSS_MODULES, saved):
                m.dist = d
            if lockstep and self._threads:
                self._barrier.abort()                # an own-rank error must not leave peers waiting
                for t in self._threads:
                    t.join(timeout=BARRIER_TIMEOUT_S)
            self.lockstep = False
            self._tls.__dict__.clear()

    def _join(self):
        for t in self._threads:
            t.join(timeout=BARRIER_TIMEOUT_S)
        self._threads = []
        if self._errors:
            raise RuntimeError(f"a simulated peer rank failed: {self._errors[0]!r}") from self._errors[0]

    def thread_rank(self) -> int:
        rank = getattr(self._tls, "rank", None)
        if rank is None:
            if self.lockstep:
                raise RuntimeError("a collective from an unknown thread in a lockstep world (CUDA backward "
                                   "runs on the autograd device thread: lockstep backward needs CPU)")
            return self.rank                        # e.g. CUDA backward on the autograd device thread
        return rank

    # ---------------------------------------------------------------- the loss call
    def call_loss(self, loss_fn, kwargs: dict):
        self._tls.args = kwargs
        if self.lockstep and not self._threads:
            grad = torch.is_grad_enabled()
            dev = next(v for v in kwargs.values() if torch.is_tensor(v)).device.type
            amp = torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)
            for r in range(self.world):
                if r != self.rank:
                    t = threading.Thread(target=self._peer_run, args=(r, loss_fn, kwargs, grad, dev, amp), daemon=True)
                    t.start()
                    self._threads.append(t)
        return loss_fn(**kwargs)

    def _peer_run(self, r, loss_fn, own_kwargs, grad, dev, amp):
        self._tls.rank = r
        try:
            args = {}
            for name, v in own_kwargs.items():
                if name in FEATURE_ARGS:
                    args[name] = self.peers[name][r].to(v.dtype).detach().requires_grad_(grad and v.requires_grad)
                elif torch.is_tensor(v):                              # the logit scales: equal on all ranks
                    args[name] = v.detach().clone().requires_grad_(grad and v.requires_grad)
                else:
                    args[name] = v
            self._tls.args = args
            with torch.set_grad_enabled(grad), torch.autocast(dev, dtype=amp[1], enabled=amp[0]):
                out = loss_fn(**args)
            if grad:
                total = out["clip_loss"] + out["distill_loss"] if isinstance(out, dict) else out
                if total.requires_grad:
                    total.backward()          # the step backpropagates clip + distill with gradient 1
        except BaseException as e:           # noqa: BLE001 — reported by the own rank at _join
            self._errors.append(e)
            with contextlib.suppress(Exception):
                self._barrier.abort()

    # ---------------------------------------------------------------- collectives
    def _count(self, op: str, nbytes: float):
        if self.thread_rank() == self.rank:
            self.calls[op] += 1
            self.wire_bytes[op] += nbytes

    def _meet(self, kind, tensor, op=None):
        """Lockstep: deposit this rank's tensor, wait for all W; returns the combined result."""
        r = self.thread_rank()
        self._slots[r] = (kind, op, tensor)
        try:
            self._barrier.wait()
        except threading.BrokenBarrierError:
            if self._errors:
                raise RuntimeError(f"a simulated rank failed: {self._errors[0]!r}") from self._errors[0]
            raise
        return self._result

    def _combine(self):
        kinds = {(s[0], str(s[1])) for s in self._slots}
        if len(kinds) != 1:
            self._errors.append(RuntimeError(f"ranks issued different collectives at the same point: {kinds}"))
            raise self._errors[-1]
        kind, op = self._slots[0][0], self._slots[0][1]
        ts = [s[2] for s in self._slots]
        if kind == "all_gather":
            self._result = torch.cat(ts)
        elif op == torch_dist.ReduceOp.MAX:
            self._result = torch.stack(ts).amax(dim=0)
        else:
            self._result = torch.stack(ts).sum(dim=0)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """All ranks' ``x``, rank-major (W·rows, ...)."""
        self._count("all_gather", (self.world - 1) * x.numel() * x.element_size())
        if self.lockstep:
            return self._meet("all_gather", x.detach())
        name, row = self._find(x)
        rows = x.shape[0]
        key = (name, x.dtype)
        if key not in self._cast:
            self._cast[key] = self.peers[name].to(x.dtype)
        out = self._cast[key][:, row:row + rows].clone()          # (W, rows, D): what the peers send
        out[self.rank] = x.detach()
        return out.reshape(self.world * rows, *x.shape[1:])

    def reduce(self, x: torch.Tensor, op) -> None:
        self._count("all_reduce", 2 * (self.world - 1) / self.world * x.numel() * x.element_size())
        if self.lockstep:
            x.copy_(self._meet("all_reduce", x.clone(), op))
        # stand-in: this rank's own part (see the module docstring)

    def reduce_scatter(self, out: torch.Tensor, inp: torch.Tensor, op) -> None:
        self._count("reduce_scatter", (self.world - 1) / self.world * inp.numel() * inp.element_size())
        rows = out.shape[0]
        r = self.thread_rank()
        total = self._meet("reduce_scatter", inp.clone(), op) if self.lockstep else inp
        out.copy_(total[r * rows:(r + 1) * rows])

    def _find(self, x: torch.Tensor):
        """(argument name, first row) of the loss argument that ``x`` is a row block of."""
        args = getattr(self._tls, "args", None) or {}
        cands = [(k, v) for k, v in args.items() if k in FEATURE_ARGS and torch.is_tensor(v) and v.dim() == 2]
        ptr = x.untyped_storage().data_ptr()
        for name, a in cands:
            if a.untyped_storage().data_ptr() == ptr and a.shape[1:] == x.shape[1:] and a.stride(0) == x.stride(0):
                off = x.storage_offset() - a.storage_offset()
                if off % a.stride(0) == 0 and 0 <= off // a.stride(0) <= a.shape[0] - x.shape[0]:
                    return name, off // a.stride(0)
        for name, a in cands:            # a copy (a cast, a re-layout): find the rows by value
            for row in range(0, a.shape[0] - x.shape[0] + 1, x.shape[0]):
                if torch.equal(a[row:row + x.shape[0]].detach().to(x.dtype), x.detach()):
                    return name, row
        raise RuntimeError(f"the loss gathers a {tuple(x.shape)} tensor that is no row block of its feature "
                           f"arguments {[k for k, _ in cands]}: call the loss through SimLoss")

    def comm(self) -> dict:
        """{op: (calls, bytes)} counted so far; :meth:`reset_comm` starts over."""
        return {op: (self.calls[op], self.wire_bytes[op]) for op in self.calls}

    def reset_comm(self) -> None:
        self.calls.clear()
        self.wire_bytes.clear()


class SimLoss:
    """A loss callable (keyword arguments, as :func:`cosmos_fast.step.cosmos_forward_loss` calls it)
    that runs inside the active simulated world, if any: it names the feature arguments for the
    gathers and, in lockstep, starts the peer ranks."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, **kwargs):
        if not _ACTIVE:
            return self.inner(**kwargs)
        return _ACTIVE[0].call_loss(self.inner, kwargs)
