"""ncp: context-pruned meta-learning (GradNCP) for any PyTorch ``nn.Module``.

Online context pruning, the bootstrap meta-loss and test-time gradient rescaling of
Tack et al., *Learning Large-scale Neural Fields via Context Pruned Meta-Learning*
(NeurIPS 2023), as a plug-in for an existing MAML training loop.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from . import diagnostics as diagnostics
from . import functional as functional
from . import losses as losses
from ._bootstrap import BootstrapMetaLoss as BootstrapMetaLoss
from ._config import MetaConfig as MetaConfig
from ._driver import AdaptResult as AdaptResult
from ._driver import MetaStepResult as MetaStepResult
from ._driver import adapt as adapt
from ._driver import forward as forward
from ._driver import meta_step as meta_step
from ._graphs import GraphedMetaStep as GraphedMetaStep
from ._lr import LearnedLR as LearnedLR
from ._memory import MemoryMeter as MemoryMeter
from ._planning import MemoryPlan as MemoryPlan
from ._planning import plan_memory as plan_memory
from ._pruning import ContextPruner as ContextPruner
from ._pruning import Pruned as Pruned
from ._pruning import Selector as Selector
from ._pruning import SmallContextWarning as SmallContextWarning
from ._rescaling import GradRescaler as GradRescaler

try:
    __version__ = version("ncp")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "AdaptResult",
    "BootstrapMetaLoss",
    "ContextPruner",
    "GradRescaler",
    "GraphedMetaStep",
    "LearnedLR",
    "MemoryMeter",
    "MemoryPlan",
    "MetaConfig",
    "MetaStepResult",
    "Pruned",
    "Selector",
    "SmallContextWarning",
    "adapt",
    "diagnostics",
    "forward",
    "functional",
    "losses",
    "meta_step",
    "plan_memory",
]
