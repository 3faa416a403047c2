"""Model helpers: the embedded tiny default policy (:mod:`agentrl.models.tiny`) and model loading
(:mod:`agentrl.models.loading`). Both import torch and transformers, so import them where needed."""
