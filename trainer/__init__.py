"""kubetune.trainer: fine-tuning that runs anywhere (CPU, one GPU, torchrun, DeepSpeed).

It knows nothing of Kubernetes; the operator imports `kubetune.trainer.api.spec`, never the reverse.
"""

from kubetune.trainer.api.spec import TrainingSpec

__all__ = ["TrainingSpec"]
