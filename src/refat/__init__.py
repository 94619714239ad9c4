"""refat: refusal feature adversarial training and the attacks and evaluations around it."""

from .directions import Directions, Selection, SelectionConfig, extract, select
from .hooks import ablate, add, capture
from .models import Model, load, wrap

__all__ = ["Directions", "Selection", "SelectionConfig", "extract", "select", "ablate", "add", "capture", "Model",
           "load", "wrap"]
__version__ = "0.1.0"
