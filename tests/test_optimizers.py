"""Optimizer implementations over the official parameter groups, equal on the same inputs."""
import importlib.util

import pytest
import torch

from utils import TINY_MODEL_16

from cosmos_fast import create_model
from cosmos_fast.config import ConfigError, load_config
from cosmos_fast.trainer import check_config
from cosmos_fast.engine import build_optimizer

CUDA = torch.cuda.is_available()


def steps(name, device, n=3):
    torch.manual_seed(0)
    model = create_model(TINY_MODEL_16).to(device)
    cfg = load_config("tiny-cpu", [f"distributed.optimizer={name}", "optim.lr=0.01"])
    opt = build_optimizer(cfg, model)
    groups = {g["weight_decay"]: len(g["params"]) for g in opt.param_groups}
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g).to(device)
        opt.step()
    return {k: v.detach().float().cpu() for k, v in model.state_dict().items()}, groups


def test_torch_adamw_official_groups():
    _, groups = steps("torch_adamw", "cpu")
    assert set(groups) == {0.0, 0.1}          # tiny-cpu weight decay on >=2-D weights
    assert sum(groups.values()) == len(list(create_model(TINY_MODEL_16).parameters()))


@pytest.mark.skipif(importlib.util.find_spec("apex") is not None, reason="apex is installed here")
def test_apex_requested_without_apex_is_a_clear_error():
    with pytest.raises(RuntimeError, match="apex is not installed"):
        steps("apex_fused_adam", "cpu")
    cfg = load_config("tiny-cpu", ["distributed.optimizer=apex_fused_adam", "data.train_shards=x-{0..3}.tar"])
    with pytest.raises(ConfigError, match="apex"):
        check_config(cfg, cuda=False)


@pytest.mark.skipif(not CUDA, reason="FusedAdam kernels need CUDA")
@pytest.mark.parametrize("name", ["deepspeed_fused_adam"] + (["apex_fused_adam"] if importlib.util.find_spec("apex") else []))
def test_fused_adam_equals_torch_adamw(name):
    ref, ref_groups = steps("torch_adamw", "cuda")
    got, groups = steps(name, "cuda")
    assert groups == ref_groups
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)
