"""Seeded N-way K-shot episode sampler.

An episode (task) picks ``ways`` classes of one split at random, relabels them ``0..ways-1`` in
random order, and draws ``shots + queries`` distinct images of each: the first ``shots`` form the
support set (ncp's *context*, adapted on) and the other ``queries`` the query set (the outer loss
and the accuracy). Support and query never share an image, and splits never share a class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, NamedTuple

import numpy as np
import torch
from torch import Tensor

from .data import ClassImages


class Episodes(NamedTuple):
    """A batch of tasks in ncp's support/query layout.

    ``support_x`` ``(tasks, ways * shots, C, H, W)`` float, ``support_y`` ``(tasks, ways * shots)``
    int64, ``query_x`` ``(tasks, ways * queries, C, H, W)``, ``query_y`` ``(tasks, ways * queries)``;
    ``classes`` ``(tasks, ways)`` the split's class indices behind labels ``0..ways-1`` and
    ``images`` ``(tasks, ways, shots + queries)`` the image indices drawn (support first).
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    classes: np.ndarray
    images: np.ndarray

    def batch(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(context_x, context_y, query_x, query_y)`` for :func:`ncp.meta_step`."""
        return self.support_x, self.support_y, self.query_x, self.query_y

    def to(self, device: torch.device | str) -> Episodes:
        """The tensors moved to ``device``."""
        return self._replace(
            support_x=self.support_x.to(device),
            support_y=self.support_y.to(device),
            query_x=self.query_x.to(device),
            query_y=self.query_y.to(device),
        )


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}.")


@dataclass
class EpisodeSampler:
    """Draws batches of episodes from one split with its own random stream.

    Args:
        split: the class images to draw from.
        ways: classes per episode (N).
        shots: support images per class (K).
        queries: query images per class (Q; MAML and the paper: 15).
        seed: seed of the stream; the same seed gives the same episodes.

    Raises:
        ValueError: when the split has fewer than ``ways`` classes or a class has fewer than
            ``shots + queries`` images.

    Example:
        >>> import numpy as np
        >>> from examples.many_shot.data import ClassImages
        >>> split = ClassImages("test", ("a", "b", "c"), tuple(np.zeros((8, 1, 16, 16), np.uint8) for _ in range(3)))
        >>> ep = EpisodeSampler(split, ways=2, shots=3, queries=2, seed=0).sample(4)
        >>> tuple(ep.support_x.shape), tuple(ep.query_y.shape)
        ((4, 6, 1, 16, 16), (4, 4))
    """

    split: ClassImages
    ways: int
    shots: int
    queries: int
    seed: int

    def __post_init__(self) -> None:
        for name in ("ways", "shots", "queries"):
            _positive(name, getattr(self, name))
        if len(self.split.classes) < self.ways:
            raise ValueError(
                f"`ways`={self.ways} needs at least {self.ways} classes but split "
                f"{self.split.name!r} has {len(self.split.classes)}; lower --ways or use a data "
                "set with more classes (Fashion-MNIST allows 5-way only)."
            )
        need = self.shots + self.queries
        if self.split.min_per_class < need:
            raise ValueError(
                f"`shots`+`queries`={need} but a class of split {self.split.name!r} has only "
                f"{self.split.min_per_class} images; lower --shots/--queries or, for glyphs, "
                "raise --variants."
            )
        self.rng = np.random.default_rng(self.seed)

    def sample(self, tasks: int) -> Episodes:
        """A batch of ``tasks`` episodes (support sorted by label, then query sorted by label)."""
        _positive("tasks", tasks)
        n, k, q = self.ways, self.shots, self.queries
        classes = np.stack(
            [self.rng.choice(len(self.split.classes), n, replace=False) for _ in range(tasks)]
        )
        images = np.empty((tasks, n, k + q), dtype=np.int64)
        pixels = []
        for t in range(tasks):
            for w, c in enumerate(classes[t]):
                pool = self.split.images[c]
                images[t, w] = self.rng.choice(len(pool), k + q, replace=False)
                pixels.append(pool[images[t, w]])
        x = torch.from_numpy(np.stack(pixels)).float().div_(255.0).sub_(0.5).div_(0.5)
        x = x.view(tasks, n, k + q, *x.shape[2:])
        labels = torch.arange(n).view(1, n, 1)
        support_y = labels.expand(tasks, n, k).reshape(tasks, n * k)
        query_y = labels.expand(tasks, n, q).reshape(tasks, n * q)
        return Episodes(
            support_x=x[:, :, :k].reshape(tasks, n * k, *x.shape[3:]),
            support_y=support_y.clone(),
            query_x=x[:, :, k:].reshape(tasks, n * q, *x.shape[3:]),
            query_y=query_y.clone(),
            classes=classes,
            images=images,
        )

    def state_dict(self) -> Dict[str, Any]:
        """The stream's state (JSON-serialisable), for checkpoints."""
        return {"bit_generator": self.rng.bit_generator.state}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore the stream saved by :meth:`state_dict`."""
        self.rng.bit_generator.state = state["bit_generator"]


def shuffle_support(ep: Episodes, generator: torch.Generator | None = None) -> Episodes:
    """The episodes with each task's support points in a random order (images and labels moved
    together; the query set untouched).

    :meth:`EpisodeSampler.sample` returns the support sorted by label. Nothing in MAML or in
    GradNCP's scoring and top-k depends on that order, but a bootstrap computed in chunks
    (``BootstrapMetaLoss(chunk_size=...)``) does: with batch norm each chunk is normalised with
    its own statistics, and a chunk of a sorted support holds one or two classes only.
    Shuffling makes every chunk a random sample of the support set.
    """
    tasks, points = ep.support_y.shape
    perm = torch.stack([torch.randperm(points, generator=generator) for _ in range(tasks)])
    perm = perm.to(ep.support_y.device)
    rows = torch.arange(tasks, device=perm.device).unsqueeze(1)
    return ep._replace(support_x=ep.support_x[rows, perm], support_y=ep.support_y[rows, perm])
