"""kubetune.trainer: fine-tuning that runs anywhere (CPU, one GPU, torchrun, DeepSpeed).

It knows nothing of Kubernetes; the operator imports `kubetune.trainer.spec`, never the reverse.
"""

from kubetune.trainer.spec import TrainingSpec

__all__ = ["TrainingSpec"]
