"""DeepSpeed ZeRO-0..3 on 2 CPU ranks (gloo) against one process on the same global batch:
losses, student and (sharded) EMA teacher; stop-and-resume; export; the fp32 teacher moves."""
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from cosmos_fast.config import load_config
from cosmos_fast.data.synthetic import write_demo_data

deepspeed = pytest.importorskip("deepspeed")

B_GLOBAL, STEPS, WORLD = 8, 3, 2


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_demo_data(tmp_path_factory.mktemp("dsdata"), n_train=64, n_val=8, samples_per_shard=16, seed=2)


def cfg_for(data, *extra):
    return load_config("tiny-cpu", [
        f"data.train_shards={data['train']}", "data.val_shards=", "data.global_size=32", "data.local_size=16",
        "data.train_num_samples=64", "data.num_workers=0", "train.progress=false", "train.tensorboard=false",
        "train.auto_resume=false", "optim.warmup=2", "optim.epochs=2", "ema.momentum=0.9",
        "model.loss_impl=blockwise", *extra])


def batches(n=STEPS + 2, b=B_GLOBAL, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        crops = [torch.randn(b, 3, 32, 32, generator=g) for _ in range(2)]
        crops += [torch.randn(b, 3, 16, 16, generator=g) for _ in range(6)]
        caps = torch.randint(1, 49000, (8 * b, 77), generator=g)
        caps[:, 10] = 49407
        caps[:, 11:] = 0
        out.append({"crops": crops, "captions": caps})
    return out


def local(batch, rank, world):
    b = batch["crops"][0].shape[0] // world
    crops = [c[rank * b:(rank + 1) * b] for c in batch["crops"]]
    caps = batch["captions"].view(8, -1, 77)[:, rank * b:(rank + 1) * b].reshape(-1, 77)
    return {"crops": crops, "captions": caps}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out, data, overrides, first, last, resume):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    from cosmos_fast.engine import full_state_dict
    from cosmos_fast.trainer import Trainer

    cfg = cfg_for(data, "distributed.backend=deepspeed", f"data.batch_size={B_GLOBAL // world}", *overrides)
    t = Trainer(cfg, out, resume=resume)
    losses = []
    for batch in batches()[first:last]:
        r = t.train_step(local(batch, rank, world))
        losses.append(float(r["loss"]))
    t.save()
    student = full_state_dict(t.student, t.stage)
    teacher = full_state_dict(t.teacher, t.stage)
    torch.save({"losses": losses, "student": student, "teacher": teacher, "step": t.step},
               os.path.join(out, f"result_{rank}.pt"))
    t.close()


def run_ranks(out, data, overrides=(), first=0, last=STEPS, resume=None):
    mp.spawn(_worker, args=(WORLD, free_port(), str(out), data, list(overrides), first, last, resume),
             nprocs=WORLD, join=True)
    return [torch.load(out / f"result_{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single(data, tmp_path_factory):
    from cosmos_fast.trainer import Trainer

    out = tmp_path_factory.mktemp("single")
    t = Trainer(cfg_for(data, "distributed.backend=none", f"data.batch_size={B_GLOBAL}"), out)
    losses = [float(t.train_step(b)["loss"]) for b in batches()[:STEPS + 2]]
    res = {"losses": losses, "student": {k: v.clone() for k, v in t.student.state_dict().items()},
           "teacher": {k: v.clone() for k, v in t.teacher.state_dict().items()}}
    t.close()
    return res


def _close(a, b, what, lr=2e-3, steps=STEPS):
    """Weights after AdamW steps: an update is ~lr·sign(g), so where g is at rounding level (e.g. the
    key-projection bias, whose gradient is exactly 0 in exact arithmetic) runs may differ by up to
    ~lr per step. Require nearly every element to agree tightly and all within that bound."""
    for k in b:
        x, y = a[k].float().reshape(b[k].shape), b[k].float()
        close = torch.isclose(x, y, rtol=1e-4, atol=5e-6)
        if k.endswith("attn.in_proj_bias"):      # the key bias: softmax-invariant, true gradient 0
            w = x.shape[0] // 3
            close[w:2 * w] = True
        worst = (x - y).abs().max().item()
        assert close.float().mean() >= 0.98, f"{what} {k}: only {close.float().mean():.3f} of elements agree"
        assert worst <= 2 * lr * steps, f"{what} {k}: max abs diff {worst:.3e}"


@pytest.mark.parametrize("stage,pool", [(0, "auto"), (1, "auto"), (2, "auto"), (3, "auto"), (3, "absorbed")])
def test_zero_stage_equals_one_process(data, tmp_path, single, stage, pool):
    """pool=absorbed: the K/V-free pooler under ZeRO-3 (weights gathered in the module's forward)
    against the one-process run with the default (shared K/V) pooler of the tiny model."""
    import copy

    ref = copy.deepcopy(single)
    # a single process needs STEPS+2 steps for the resume test; recompute the reference at STEPS
    from cosmos_fast.trainer import Trainer

    t = Trainer(cfg_for(data, "distributed.backend=none", f"data.batch_size={B_GLOBAL}"), tmp_path / "ref")
    for b in batches()[:STEPS]:
        t.train_step(b)
    ref["student"], ref["teacher"] = t.student.state_dict(), t.teacher.state_dict()
    t.close()
    results = run_ranks(tmp_path / "ds", data, [f"distributed.zero_stage={stage}", "distributed.grad_semantics=exact",
                                                f"model.pool_impl={pool}"])
    for res in results:
        torch.testing.assert_close(torch.tensor(res["losses"]), torch.tensor(ref["losses"][:STEPS]),
                                   rtol=1e-5, atol=1e-6)
        _close(res["student"], ref["student"], f"ZeRO-{stage} student")
        _close(res["teacher"], ref["teacher"], f"ZeRO-{stage} teacher (sharded EMA)" if stage == 3 else "teacher")
    cfg = json.loads((tmp_path / "ds" / "deepspeed_config.json").read_text())
    assert cfg["train_batch_size"] == B_GLOBAL and cfg["gradient_accumulation_steps"] == 1
    assert cfg["zero_optimization"]["stage"] == stage


def test_stop_resume_and_export(data, tmp_path, single):
    over = ["distributed.zero_stage=3", "distributed.grad_semantics=exact", "distributed.keep_last=1"]
    run_ranks(tmp_path / "run", data, over, 0, 2)                      # 2 steps, then save and stop
    tag = (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()
    assert tag == "step_00000002" and (tmp_path / "run" / "checkpoints" / tag / "COMPLETE").is_file()
    resumed = run_ranks(tmp_path / "run", data, over, 2, STEPS + 2, resume=str(tmp_path / "run"))
    tags = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*"))
    assert tags == [f"step_{STEPS + 2:08d}"]                           # keep_last=1 retention
    for res in resumed:
        assert res["step"] == STEPS + 2
        torch.testing.assert_close(torch.tensor(res["losses"]), torch.tensor(single["losses"][2:]),
                                   rtol=1e-5, atol=1e-6)
        _close(res["teacher"], single["teacher"], "resumed teacher")
    from cosmos_fast import create_model, load_checkpoint
    from cosmos_fast.export import export_checkpoint

    path = export_checkpoint(tmp_path / "run", tmp_path / "exported.pt")
    body = torch.load(path, weights_only=True)
    assert body["epoch"] == 0 and all(k.startswith("module.") for k in body["student"])
    # the export is the newest checkpoint (written at the end of the resumed run): it loads into
    # create_model and equals the weights the ranks held at that point
    for which in ("student", "teacher"):
        m = create_model("tiny")
        load_checkpoint(path, m, which=which)
        for k, v in m.state_dict().items():
            torch.testing.assert_close(v, resumed[0][which][k].reshape(v.shape), msg=f"{which} {k}")


def test_teacher_moves_under_bf16_zero3_shards(data, tmp_path):
    """The fp32 teacher shards move when the student's shards are bf16 (m = 0.999)."""
    from cosmos_fast.engine import ema_update_zero

    class P:   # a stand-in for ZeRO-3 parameters: only ds_tensor is read
        def __init__(self, t):
            self.ds_tensor = t

    class M:
        def __init__(self, d):
            self.d = d

        def named_parameters(self):
            return iter(self.d.items())

    torch.manual_seed(0)
    s = {"w": P(torch.randn(1000).to(torch.bfloat16))}
    t = {"w": P(torch.randn(1000))}
    before = t["w"].ds_tensor.clone()
    ema_update_zero(M(t), M(s), 0.999, stage=3)
    after = t["w"].ds_tensor
    assert after.dtype == torch.float32
    assert (after != before).float().mean() > 0.99
    torch.testing.assert_close(after, 0.999 * before + 0.001 * s["w"].ds_tensor.float(), rtol=1e-6, atol=1e-7)


def _cli_env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _cli_overrides(data, out):
    return ["--config", "tiny-cpu", "--output-dir", str(out), f"data.train_shards={data['train']}",
            "data.val_shards=", "data.num_workers=0", "data.batch_size=4", "data.global_size=32",
            "data.local_size=16", "data.train_num_samples=64", "train.progress=false", "train.tensorboard=false"]


def test_deepspeed_launcher_two_cpu_ranks(data, tmp_path):
    """The documented launch: deepspeed --num_gpus 2 --module cosmos_fast.train ... (CPU, gloo)."""
    import shutil
    import subprocess
    import sys

    launcher = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
    out = tmp_path / "run"
    cmd = [launcher, "--num_gpus", "2", "--master_port", str(free_port()), "--module", "cosmos_fast.train",
           *_cli_overrides(data, out), "distributed.backend=deepspeed", "distributed.zero_stage=2",
           "train.max_steps=2"]
    res = subprocess.run(cmd, env=_cli_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2]              # written once, by rank 0
    assert (out / "checkpoints" / "step_00000002" / "COMPLETE").is_file()
    assert json.loads((out / "deepspeed_config.json").read_text())["train_batch_size"] == 8


def test_sigterm_saves_and_exits(data, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "cosmos_fast.train", *_cli_overrides(data, out), "distributed.backend=none",
           "train.save_every_steps=0", "optim.epochs=50"]
    proc = subprocess.Popen(cmd, env=_cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.is_file() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, output[-3000:]
    assert "SIGTERM received" in output
    body = torch.load(out / "checkpoints" / "epoch_latest.pt", weights_only=True)
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert body["trainer"]["step"] == steps[-1] >= 2


def test_incomplete_checkpoint_is_ignored_and_retention(tmp_path):
    from cosmos_fast.checkpointing import resolve_ds_checkpoint

    ck = tmp_path / "checkpoints"
    for step, complete in ((10, True), (20, True), (30, False)):      # 30: crashed mid-save
        d = ck / f"step_{step:08d}"
        d.mkdir(parents=True)
        if complete:
            (d / "COMPLETE").write_text("{}")
    (ck / "latest").write_text("step_00000020")
    assert resolve_ds_checkpoint(tmp_path) == ck / "step_00000020"
    assert resolve_ds_checkpoint(ck / "step_00000010") == ck / "step_00000010"
    (ck / "latest").write_text("step_00000030")
    with pytest.raises(FileNotFoundError, match="incomplete"):
        resolve_ds_checkpoint(tmp_path)


def _resume_worker(rank, world, port, out, data, source, result):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    from cosmos_fast.trainer import Trainer

    cfg = cfg_for(data, "distributed.backend=deepspeed", f"data.batch_size={B_GLOBAL // world}",
                  "distributed.zero_stage=2")
    try:
        t = Trainer(cfg, out, resume=source)
        torch.save({"step": t.step, "epoch": t.epoch}, result)
    except ValueError as e:
        torch.save({"error": str(e)}, result)


def test_other_number_of_ranks_goes_through_export(data, tmp_path):
    """A 2-rank DeepSpeed checkpoint is refused by 1 rank with a pointer to export; the exported
    file then resumes weights and schedule position on 1 rank."""
    from cosmos_fast.export import export_checkpoint

    run_ranks(tmp_path / "two", data, ["distributed.zero_stage=2"], 0, 2)
    mp.spawn(_resume_worker, args=(1, free_port(), str(tmp_path / "one"), data, str(tmp_path / "two"),
                                   str(tmp_path / "r1.pt")), nprocs=1, join=True)
    assert "written by 2 ranks" in torch.load(tmp_path / "r1.pt", weights_only=True)["error"]
    exported = export_checkpoint(tmp_path / "two", tmp_path / "two.pt")
    mp.spawn(_resume_worker, args=(1, free_port(), str(tmp_path / "one"), data, str(exported),
                                   str(tmp_path / "r2.pt")), nprocs=1, join=True)
    assert torch.load(tmp_path / "r2.pt", weights_only=True) == {"step": 2, "epoch": 0}
