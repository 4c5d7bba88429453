"""Bad input gets a clear error naming the argument, the value and the fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ncp
from tests import _models

CFG = ncp.MetaConfig(inner_steps=2)


def model_and_data(points=16):
    torch.manual_seed(0)
    return _models.mlp(), torch.randn(2, points, 2), torch.rand(2, points, 1)


def test_mismatched_x_y():
    model, x, y = model_and_data()
    with pytest.raises(
        ValueError,
        match=r"`x` and `y` must share their leading \(tasks, points\) dimensions, got \(2, 16, 2\) and \(2, 15, 1\)",
    ):
        ncp.meta_step(model, (x, y[:, :15]), CFG)
    with pytest.raises(ValueError, match=r"`context_x` and `context_y`"):
        ncp.meta_step(model, (x, y[:, :15], x, y), CFG)
    with pytest.raises(ValueError, match=r"same number of tasks, got 2 and 1"):
        ncp.meta_step(model, (x, y, x[:1], y[:1]), CFG)


def test_x_without_points_dim():
    model, x, y = model_and_data()
    with pytest.raises(
        ValueError, match=r"`x` must have shape \(tasks, points, ...\), got \(16,\)"
    ):
        ncp.meta_step(model, (x[0, :, 0], y[0, :, 0]), CFG)


def test_batch_of_wrong_length():
    model, x, y = model_and_data()
    with pytest.raises(ValueError, match=r"`batch` must be \(x, y\).*got tuple of length 3"):
        ncp.meta_step(model, (x, y, x), CFG)


def test_scalar_loss():
    model, x, y = model_and_data()

    def mean_loss(pred, target):
        return ((pred - target) ** 2).mean()

    with pytest.raises(
        ValueError,
        match=r"`loss_fn` must return per-point losses of shape \(2, 8\), got \(\). Pass reduction='none'",
    ):
        ncp.meta_step(model, (x, y), CFG, loss_fn=mean_loss)


def test_ratio_keeping_nothing_in_meta_step():
    model, x, y = model_and_data(points=16)
    cfg = ncp.MetaConfig(pruner=ncp.ContextPruner(ratio=0.05))
    with pytest.raises(ValueError, match=r"keeps 0 of 16 context points; use ratio >= 0.0625"):
        ncp.meta_step(model, (x, y), cfg)


def test_non_finite_inner_loss():
    model, x, y = model_and_data()
    y = y.clone()
    y[1, 3] = float("nan")
    with pytest.raises(FloatingPointError, match=r"non-finite inner loss at step 0 of task 1"):
        ncp.meta_step(model, (x, y), ncp.MetaConfig(inner_steps=2, pruner=None))


def test_diverging_inner_loop():
    model, x, y = model_and_data()
    with pytest.raises(FloatingPointError, match=r"non-finite inner loss.*Lower `inner_lr`"):
        ncp.meta_step(
            model,
            (x, y * 1e3),
            ncp.MetaConfig(inner_steps=12, inner_lr=1e4, pruner=None, bootstrap=None),
        )


def test_params_dict_mismatch():
    model, x, y = model_and_data()
    params = ncp.adapt(model, x, y, ncp.MetaConfig(pruner=None), steps=1).params
    bad = dict(params)
    bad.pop("0.bias")
    with pytest.raises(ValueError, match=r"missing \['0.bias'\]"):
        ncp.forward(model, bad, x)
    bad = dict(params, extra=torch.zeros(2))
    with pytest.raises(ValueError, match=r"unexpected \['extra'\]"):
        ncp.forward(model, bad, x)
    with pytest.raises(ValueError, match=r"`params\['0.weight'\]` must have shape \(1, 16, 2\)"):
        ncp.forward(model, params, x[:1])
    with pytest.raises(ValueError, match=r"`params` does not match"):
        ncp.adapt(model, x, y, ncp.MetaConfig(pruner=None), params={"w": torch.zeros(1)})


def test_unused_parameter():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(2, 1)
            self.spare = nn.Linear(2, 1)

        def forward(self, x):
            return self.used(x)

    _, x, y = model_and_data()
    with pytest.raises(
        ValueError, match=r"parameter 'spare.weight' got no gradient from the inner loss; freeze it"
    ):
        ncp.meta_step(Unused(), (x, y), ncp.MetaConfig(inner_steps=1, pruner=None, bootstrap=None))


def test_device_mismatch():
    model, x, y = model_and_data()
    with pytest.raises(
        ValueError, match=r"the model's parameters are on cpu but an input is on meta"
    ):
        ncp.meta_step(model, (x.to("meta"), y.to("meta")), CFG)


def test_all_parameters_frozen():
    model, x, y = model_and_data()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match=r"`model` has no trainable parameters"):
        ncp.meta_step(model, (x, y), CFG)


@pytest.mark.cuda
def test_generator_on_wrong_device():
    model, x, y = model_and_data()
    cfg = ncp.MetaConfig(
        pruner=ncp.ContextPruner(score="random", generator=torch.Generator(device="cuda"))
    )
    with pytest.raises(
        ValueError, match=r"`ContextPruner.generator` is on cuda(:0)? but the context is on cpu"
    ):
        ncp.meta_step(model, (x, y), cfg)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(inner_steps=0), r"`MetaConfig.inner_steps` must be an int >= 1, got 0"),
        (dict(inner_steps=2.0), r"`MetaConfig.inner_steps` must be an int >= 1, got 2.0"),
        (dict(inner_lr=-1.0), r"`MetaConfig.inner_lr` must be a number > 0, got -1.0"),
        (dict(first_order=1), r"`MetaConfig.first_order` must be a bool, got 1"),
        (dict(pruner=0.25), r"`MetaConfig.pruner` must be an ncp.ContextPruner or None, got float"),
        (
            dict(bootstrap=5),
            r"`MetaConfig.bootstrap` must be an ncp.BootstrapMetaLoss or None, got int",
        ),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ncp.MetaConfig(**kwargs)


def test_wrong_cfg_type_and_adapt_arguments():
    model, x, y = model_and_data()
    with pytest.raises(TypeError, match=r"`cfg` must be an ncp.MetaConfig, got dict"):
        ncp.meta_step(model, (x, y), {"inner_steps": 2})  # type: ignore[arg-type]
    no_pruner = ncp.MetaConfig(pruner=None)
    with pytest.raises(ValueError, match=r"needs `cfg.pruner`"):
        ncp.adapt(model, x, y, no_pruner, mode="rescaled")
    with pytest.raises(ValueError, match=r"`mode` must be 'full', 'pruned', 'rescaled' or an"):
        ncp.adapt(model, x, y, CFG, mode="prune")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`steps` must be an int >= 0, got -1"):
        ncp.adapt(model, x, y, CFG, steps=-1)
    with pytest.raises(ValueError, match=r"`lr` must be a number > 0, got 0"):
        ncp.adapt(model, x, y, CFG, lr=0)


def test_mse_shape_mismatch_names_the_fix():
    with pytest.raises(
        ValueError,
        match=r"`ncp.losses.mse` needs pred and target of the same shape, got \(2, 3, 1\) and \(2, 3\)",
    ):
        ncp.losses.mse(torch.zeros(2, 3, 1), torch.zeros(2, 3))


def test_meta_step_under_no_grad_or_inference_mode_is_refused():
    model = _models.mlp(2, 1)
    x, y = torch.rand(2, 8, 2), torch.rand(2, 8, 1)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode(), pytest.raises(RuntimeError, match="gradients are disabled here"):
            ncp.meta_step(model, (x, y), ncp.MetaConfig(inner_steps=1))


def test_adapt_under_inference_mode_is_refused_but_no_grad_works():
    model = _models.mlp(2, 1)
    x, y = torch.rand(2, 8, 2), torch.rand(2, 8, 1)
    cfg = ncp.MetaConfig(inner_steps=2)
    with (
        torch.inference_mode(),
        pytest.raises(RuntimeError, match=r"wrap the call in torch.no_grad"),
    ):
        ncp.adapt(model, x, y, cfg, mode="rescaled")
    with torch.no_grad():
        quiet = ncp.adapt(model, x, y, cfg, mode="rescaled").params
    loud = ncp.adapt(model, x, y, cfg, mode="rescaled").params
    for name, value in loud.items():
        torch.testing.assert_close(quiet[name], value)
