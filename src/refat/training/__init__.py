"""Training: refusal training (RT), ReFAT, CAT and LAT on one trainer with pluggable perturbations."""

from .data import Pair, PairsConfig, build_pairs, load_or_build_pairs, training_pairs
from .perturbations import ABLATIONS, METHODS, AdversarialConfig, RefatConfig
from .trainer import LoraSettings, TrainConfig, TrainingDivergedError, TrainResult, train

__all__ = ["Pair", "PairsConfig", "build_pairs", "load_or_build_pairs", "training_pairs", "ABLATIONS", "METHODS",
           "AdversarialConfig", "RefatConfig", "LoraSettings",
           "TrainConfig", "TrainResult", "TrainingDivergedError", "train"]
