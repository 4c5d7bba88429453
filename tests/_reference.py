"""A small, slow, obviously-correct re-implementation of the paper's meta-training step.

It loops over tasks and points in Python, computes exact per-point last-layer gradients with
autograd one point at a time, and shares no code with ncp (only torch).
"""

from __future__ import annotations

import math

import torch
from torch.func import functional_call


def point_losses(model, params, x, y, loss_fn):
    """Per-point losses ``(points,)`` of one task."""
    out = functional_call(model, params, (x,))
    return loss_fn(out.unsqueeze(0), y.unsqueeze(0)).squeeze(0)


def exact_scores(model, params, x, y, loss_fn, head_names):
    """Norm of d l_j / d (head parameters) for every point j of one task, one at a time."""
    detached = {n: v.detach().requires_grad_(True) for n, v in params.items()}
    scores = []
    for j in range(x.shape[0]):
        lj = point_losses(model, detached, x[j : j + 1], y[j : j + 1], loss_fn).sum()
        grads = torch.autograd.grad(lj, [detached[n] for n in head_names])
        scores.append(torch.sqrt(sum(g.pow(2).sum() for g in grads)))
    return torch.stack(scores)


def balanced_top(scores, labels, k, classes):
    """Class-balanced selection of one task, written as a plain loop: each class keeps its
    ``floor(k * n_c / n)`` best points, then the leftover slots go one at a time to the class
    whose best unkept point scores highest (each class at most once)."""
    n = scores.shape[0]
    members = {c: [j for j in range(n) if int(labels[j]) == c] for c in range(classes)}
    for js in members.values():  # best first; ties: lower index first
        js.sort(key=lambda j: (-float(scores[j]), j))
    kept = []
    for js in members.values():
        kept += js[: len(js) * k // n]
    leftover = []
    for js in members.values():
        share = len(js) * k // n
        if share < len(js):
            leftover.append(js[share])
    leftover.sort(key=lambda j: (-float(scores[j]), j))
    kept += leftover[: k - len(kept)]
    return torch.tensor(sorted(kept))


def sgd(params, loss, lr, create_graph):
    """One SGD step; ``lr`` is a number or a function of the parameter name."""
    names = list(params)
    grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=create_graph)
    if not create_graph:
        grads = [g.detach() for g in grads]
    rate = lr if callable(lr) else (lambda _name: lr)
    return {n: params[n] - rate(n) * g for n, g in zip(names, grads, strict=True)}


def meta_step(
    model,
    cx,
    cy,
    qx,
    qy,
    *,
    loss_fn,
    steps,
    lr,
    first_order=False,
    ratio=None,
    head_names=(),
    boot_steps=0,
    boot_lr=0.05,
    weight=100.0,
    balance_classes=None,
):
    """Hand-written GradNCP / MAML step (Algorithm 1). Returns a dict of results.

    ``lr`` is a number or a function ``lr(step, name)`` (learned rates); ``balance_classes``
    selects with :func:`balanced_top` instead of the global top-k.
    """
    theta0 = {n: p for n, p in model.named_parameters() if p.requires_grad}
    query, boot, kept, adapted = [], [], [], []
    for i in range(cx.shape[0]):
        params = dict(theta0)
        task_kept = []
        for step in range(steps):
            x, y = cx[i], cy[i]
            if ratio is not None:
                s = exact_scores(model, params, x, y, loss_fn, head_names)
                k = math.floor(round(ratio * x.shape[0], 9))
                if balance_classes is None:
                    idx = torch.argsort(s, descending=True)[:k]
                else:
                    idx = balanced_top(s, y, k, balance_classes)
                task_kept.append(idx)
                x, y = x[idx], y[idx]
            loss = point_losses(model, params, x, y, loss_fn).mean()
            step_lr = (lambda n, _k=step: lr(_k, n)) if callable(lr) else lr
            params = sgd(params, loss, step_lr, create_graph=not first_order)
        kept.append(task_kept)
        adapted.append(params)
        query.append(point_losses(model, params, qx[i], qy[i], loss_fn).mean())
        if boot_steps:
            target = {n: v.detach() for n, v in params.items()}
            for _ in range(boot_steps):
                leaves = {n: v.requires_grad_(True) for n, v in target.items()}
                loss = point_losses(model, leaves, cx[i], cy[i], loss_fn).mean()
                target = {n: v.detach() for n, v in sgd(leaves, loss, boot_lr, False).items()}
            sq = sum((params[n] - target[n]).pow(2).sum() for n in params)
            boot.append(weight * torch.sqrt(sq))
    query_t = torch.stack(query)
    boot_t = torch.stack(boot) if boot else None
    total = query_t + (boot_t if boot_t is not None else 0.0)
    return {
        "loss": total.mean(),
        "query_loss": query_t,
        "bootstrap_loss": boot_t,
        "kept": kept,
        "params": adapted,
    }


def rescaled_step(full_grads, pruned_grads):
    """Eq. 4 for one task: lists of gradient tensors."""
    full = torch.sqrt(sum(g.pow(2).sum() for g in full_grads))
    pruned = torch.sqrt(sum(g.pow(2).sum() for g in pruned_grads))
    return [g * (pruned / full) for g in full_grads]


def meta_step_of(model, x, y, cfg, head_names=()):
    """:func:`meta_step` with the settings of an ``ncp.MetaConfig`` (the query set is the
    context), so that a test states the configuration once."""
    kw = dict(loss_fn=cfg.loss_fn, steps=cfg.inner_steps, lr=cfg.inner_lr)
    kw["first_order"] = cfg.first_order
    if cfg.pruner is not None:
        kw.update(ratio=cfg.pruner.ratio, head_names=head_names)
    if cfg.bootstrap is not None:
        b = cfg.bootstrap
        kw.update(boot_steps=b.steps, boot_lr=b.lr, weight=b.weight)
    return meta_step(model, x, y, x, y, **kw)
