"""Reading the code blocks of the docs pages, so that tests can run what the pages show."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, Tuple

import torch
from torch import Tensor, nn

DOCS = Path(__file__).resolve().parents[1] / "docs"

_NAMED_BLOCK = re.compile(
    r"^```\{code-block\} (?P<lang>\w+)\n:name: (?P<name>[\w-]+)\n\n(?P<body>.*?)^```$",
    re.MULTILINE | re.DOTALL,
)


def named_blocks(page: str) -> Dict[str, str]:
    """The ``{code-block}`` bodies of ``docs/<page>`` that carry a ``:name:``, by name."""
    text = (DOCS / page).read_text()
    return {m["name"]: m["body"] for m in _NAMED_BLOCK.finditer(text)}


def diff_sides(diff: str) -> Tuple[str, str]:
    """The old and the new file of a diff block without hunk headers."""
    old, new = [], []
    for line in diff.splitlines():
        tag, body = (line[:1], line[1:]) if line else (" ", "")
        assert tag in " -+", f"not a diff line: {line!r}"
        if tag in " -":
            old.append(body)
        if tag in " +":
            new.append(body)
    return "\n".join(old) + "\n", "\n".join(new) + "\n"


def page_model() -> nn.Module:
    """A small seeded field network standing in for the pages' ``make_model()``."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return model


def page_batch(seed: int, tasks: int = 2, points: int = 64) -> Tuple[Tensor, Tensor]:
    """Coordinates ``(tasks, points, 2)`` and RGB values ``(tasks, points, 3)`` for the pages."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(tasks, points, 2, generator=g), torch.rand(tasks, points, 3, generator=g)
