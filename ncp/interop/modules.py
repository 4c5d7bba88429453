"""GradNCP for models written the way other MAML codebases write them.

ncp runs any ``nn.Module`` through ``torch.func.functional_call``, so most existing models need
no adapter at all:

- a learn2learn-style *clone* (an ``nn.Module`` whose parameters are non-leaf tensors computed
  from the original model, replaced by ``p - lr * g`` at every inner step) can be passed to
  :class:`ncp.ContextPruner` as it is; :func:`params_of` reads its current tensors into ncp's
  per-task dict, graph kept, for :class:`ncp.BootstrapMetaLoss` and ``pruner.scores``;
- a torchmeta-style ``MetaModule`` whose ``forward(x, params=None)`` falls back to its own
  parameters works with :func:`ncp.meta_step` directly;
- a network written as a function of a positional weight list, ``fn(x, weights)``, becomes an
  ``nn.Module`` with :class:`FunctionalModel`.

Adapting a subset of the parameters, such as per-task latent modulations (COIN++, functa), is
``ncp.MetaConfig(adapt_only=(...))``; see :doc:`/interop`.
"""

from __future__ import annotations

from typing import Callable, List, Sequence

from torch import Tensor, nn

from .._checks import is_int_at_least
from .._params import Params, init_params, trainable_names

__all__ = ["FunctionalModel", "params_of"]


def params_of(module: nn.Module, tasks: int = 1) -> Params:
    """The current trainable tensors of ``module`` as ncp per-task parameters, graph kept.

    For a learn2learn-style clone these are the non-leaf tensors of the inner loop so far, so a
    loss built on the result (the bootstrap term) differentiates back to the original model's
    parameters. Each entry is a view expanded over ``tasks``: no copy, no detach. Tensors with
    ``requires_grad=False`` (frozen parameters) are left out, as everywhere in ncp.

    Args:
        module: any ``nn.Module``, e.g. ``maml.clone()`` after a few ``adapt`` steps.
        tasks: size of the leading task dimension (1 for one task at a time).

    Returns:
        ``{name: (tasks, *param.shape)}`` for every trainable tensor of ``module``.

    Raises:
        TypeError: when ``module`` is not an ``nn.Module``.
        ValueError: when ``tasks`` is not a positive int or ``module`` has nothing trainable.

    Example:
        >>> import torch, ncp
        >>> from ncp.interop.modules import params_of
        >>> model = torch.nn.Linear(2, 1)
        >>> params = params_of(model, tasks=3)
        >>> params["weight"].shape, params["weight"].requires_grad
        (torch.Size([3, 1, 2]), True)
        >>> term, _ = ncp.BootstrapMetaLoss(steps=2)(model, params, torch.rand(3, 8, 2), torch.rand(3, 8, 1))
        >>> term.sum().backward()
        >>> model.weight.grad.shape
        torch.Size([1, 2])
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"`module` must be an nn.Module, got {type(module).__name__}.")
    if not is_int_at_least(tasks, 1):
        raise ValueError(f"`tasks` must be an int >= 1, got {tasks!r}.")
    if not trainable_names(module):
        raise ValueError(
            f"`module` ({type(module).__name__}) has no trainable tensors (all have "
            "requires_grad=False); pass the clone being adapted, not a detached copy."
        )
    return init_params(module, tasks)


class FunctionalModel(nn.Module):
    """An ``nn.Module`` for a network written as a function of a positional weight list.

    ``FunctionalModel(fn, weights)(x)`` is ``fn(x, list_of_weights)``, reading the weights from
    the module's parameters at call time, so that ``torch.func.functional_call`` (and therefore
    every ncp entry point) can substitute per-task tensors for them.

    An ``nn.Parameter`` in ``weights`` is registered as it is (the same object: an optimizer
    already built over ``weights`` keeps working); any other tensor is wrapped in a new
    ``nn.Parameter`` sharing its storage, so build the optimizer over ``model.parameters()``.
    ``requires_grad`` decides what is trainable, as everywhere in ncp: a tensor with
    ``requires_grad=False`` is a frozen weight shared by all tasks.

    Args:
        fn: ``fn(x, weights) -> output``; called on one task's ``(points, ...)`` inputs with
            ``weights`` a list in the order given here. It must be traceable by
            ``torch.func.vmap`` unless ``MetaConfig(vmap_tasks=False)``.
        weights: the initial weights.
        names: one parameter name per weight (no ``.``), used by ``MetaConfig.adapt_only`` and
            in per-task parameter dicts; default ``"0"``, ``"1"``, ...

    The whole function is one module, so the ``"gradncp"`` score has no separate last layer:
    it is the exact per-point gradient norm over all trainable weights (correct, but one
    per-point gradient per context point). ``ContextPruner(score="loss")`` is the cheap
    alternative.

    Raises:
        TypeError: when ``fn`` is not callable or a weight is not a tensor.
        ValueError: on a ``names`` list of the wrong length, a repeated, empty or dotted name,
            or a name that is already a module attribute.

    Example:
        >>> import torch, ncp
        >>> from ncp.interop.modules import FunctionalModel
        >>> def field(x, w):
        ...     return torch.tanh(x @ w[0] + w[1]) @ w[2]
        >>> weights = [torch.randn(2, 16, requires_grad=True), torch.zeros(16, requires_grad=True),
        ...            torch.randn(16, 1, requires_grad=True)]
        >>> model = FunctionalModel(field, weights, names=["w1", "b1", "w2"])
        >>> cfg = ncp.MetaConfig(inner_steps=2, pruner=ncp.ContextPruner(ratio=0.5, score="loss"))
        >>> out = ncp.meta_step(model, (torch.rand(3, 32, 2), torch.rand(3, 32, 1)), cfg)
        >>> out.loss.backward()
        >>> model.w1.grad.shape, out.params["w1"].shape
        (torch.Size([2, 16]), torch.Size([3, 2, 16]))
    """

    def __init__(
        self,
        fn: Callable[[Tensor, List[Tensor]], Tensor],
        weights: Sequence[Tensor],
        names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if not callable(fn):
            raise TypeError(f"`fn` must be callable as fn(x, weights), got {type(fn).__name__}.")
        self.fn = fn
        self.names: tuple[str, ...] = ()
        weights = list(weights)
        for i, w in enumerate(weights):
            if not isinstance(w, Tensor):
                raise TypeError(f"`weights[{i}]` must be a tensor, got {type(w).__name__}.")
        names = [str(i) for i in range(len(weights))] if names is None else list(names)
        if len(names) != len(weights):
            raise ValueError(
                f"`names` must give one name per weight: got {len(names)} names for "
                f"{len(weights)} weights."
            )
        for name in names:
            if not isinstance(name, str) or not name or "." in name:
                raise ValueError(
                    f"`names` must be non-empty strings without '.', got {name!r}; "
                    "write e.g. 'layer1_weight' for 'layer1.weight'."
                )
            if hasattr(self, name):
                raise ValueError(
                    f"`names` entry {name!r} is already an attribute of nn.Module; rename it, "
                    f"e.g. {name + '_'!r}."
                )
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"`names` must be unique, got {repeated} more than once.")
        self.names = tuple(names)
        for name, w in zip(names, weights, strict=True):
            param = (
                w
                if isinstance(w, nn.Parameter)
                else nn.Parameter(w.detach(), requires_grad=w.requires_grad)
            )
            self.register_parameter(name, param)

    def weights(self) -> List[Tensor]:
        """The current weights, in ``fn``'s order (per-task tensors inside ncp's calls)."""
        return [getattr(self, name) for name in self.names]

    def forward(self, x: Tensor) -> Tensor:
        """``fn(x, weights)``."""
        return self.fn(x, self.weights())

    def extra_repr(self) -> str:
        fn_name = getattr(self.fn, "__qualname__", type(self.fn).__name__)
        return f"fn={fn_name}, names={list(self.names)}"
