"""Meta-learning of Hamiltonians on ``torch.func``: MAML and variants, the pre-training baseline, adaptation.

>>> from metaham.meta import MAML, MetaTask, Pretrain, VectorFieldLoss, adapt, to_meta_tasks
"""
from .adapt import Adaptation, adapt, adapt_tasks
from .batching import MetaTask, TaskUnits, task_units, to_meta_tasks
from .losses import VectorFieldLoss, log_cosh, mse
from .maml import MAML
from .pretrain import Pretrain

__all__ = [
    "MAML", "Adaptation", "MetaTask", "Pretrain", "VectorFieldLoss", "adapt", "adapt_tasks", "log_cosh", "mse",
    "TaskUnits", "task_units", "to_meta_tasks",
]
