"""Training: refusal training (RT), ReFAT, CAT and LAT on one trainer with pluggable perturbations."""

from .data import Pair, build_pairs, load_or_build_pairs, training_pairs
from .perturbations import METHODS, AdversarialConfig, RefatConfig
from .trainer import LoraSettings, TrainConfig, TrainingDivergedError, TrainResult, train

__all__ = ["Pair", "build_pairs", "load_or_build_pairs", "training_pairs", "METHODS", "AdversarialConfig", "RefatConfig", "LoraSettings",
           "TrainConfig", "TrainResult", "TrainingDivergedError", "train"]
