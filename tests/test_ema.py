"""minisora.ema: the fused update matches the textbook formula, and the EMA follows the parameters' device."""

import pytest
import torch
from torch import nn

from minisora.ema import EMA


def _net(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).to(dtype)


def test_update_is_the_lerp_formula():
    net = _net()
    ema = EMA.of(net, decay=0.9)
    start = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update(net)
    for name, p in net.named_parameters():
        expected = 0.9 * start[name] + 0.1 * p.detach()
        torch.testing.assert_close(ema.state_dict()[name], expected)
    ema.update(net)  # a second step moves another 10% of the remaining gap
    for name, p in net.named_parameters():
        gap = (p.detach() - start[name]) * 0.9 * 0.9
        torch.testing.assert_close(p.detach() - ema.state_dict()[name], gap)


def test_ema_is_fp32_on_the_parameters_device():
    net = _net(torch.bfloat16)
    ema = EMA.of(net, decay=0.5)
    assert all(t.dtype == torch.float32 for t in ema.state_dict().values())
    ema.update(net)  # bf16 parameters are lerped into the fp32 shadow
    meta = _net().to("meta")  # a second device type on a CPU-only machine: the EMA goes where the params are
    assert EMA.of(meta, 0.99).device.type == "meta"


def test_update_from_parameters_on_another_device_is_refused():
    ema = EMA.of(_net(), decay=0.9)
    with pytest.raises(RuntimeError, match="EMA lives on cpu but the parameters are on meta.*after booster.boost"):
        ema.update(_net().to("meta"))


def test_state_dict_round_trip_and_wrong_model():
    net = _net()
    ema = EMA.of(net, decay=0.9)
    saved = {k: v + 1 for k, v in ema.state_dict().items()}
    other = EMA.of(net, decay=0.9)
    other.load_state_dict(saved)
    assert all(torch.equal(other.state_dict()[k], saved[k]) for k in saved)
    with pytest.raises(ValueError, match="ema.safetensors lacks 1 of the model's parameters"):
        other.load_state_dict({k: v for k, v in saved.items() if k != "1.bias"}, source="ema.safetensors")
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\]"):
        EMA.of(net, decay=1.5)
