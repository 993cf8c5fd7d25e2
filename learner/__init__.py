"""The learner: GRPO math (``learner.grpo``) and the policy-update class ``Learner``."""

from learner.batching import TrainSample
from learner.config import AlgorithmConfig, LearnerConfig
from learner.learner import Learner

__all__ = ["AlgorithmConfig", "Learner", "LearnerConfig", "TrainSample"]
