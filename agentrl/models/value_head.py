"""A causal LM's trunk with a scalar head: PPO's critic, and the outcome and process reward models.

Saved as the trunk (``save_pretrained``) plus ``value_head.safetensors``; a directory without the head file
loads with a zero head (a fresh critic from a policy's weights).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

__all__ = ["VALUE_HEAD_FILE", "ValueModel"]

VALUE_HEAD_FILE = "value_head.safetensors"


class ValueModel(torch.nn.Module):
    """A transformer trunk with a scalar head: the value of the state before each token is sampled.

    ``forward(batch)`` returns ``values_B_T`` aligned with the ledger like logprobs: position ``t`` holds
    ``V(tokens before t)``, read from the hidden state at ``t - 1`` (0 at position 0).
    """

    def __init__(self, backbone: Any):
        super().__init__()
        self.backbone = backbone
        self.head = torch.nn.Linear(backbone.config.hidden_size, 1)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, device: Any = "cpu") -> ValueModel:
        """The trunk of a causal LM (or of a saved critic) plus its head (zeros when none was saved)."""
        from safetensors.torch import load_file
        from transformers import AutoModel

        from agentrl.models.loading import resolve_model

        resolved = resolve_model(name_or_path)
        critic = cls(AutoModel.from_pretrained(resolved, dtype=torch.float32))
        head = Path(resolved) / VALUE_HEAD_FILE
        if head.is_file():
            critic.head.load_state_dict(load_file(head))
        return critic.to(device)

    def save_pretrained(self, path: str | Path, safe_serialization: bool = True) -> None:
        from safetensors.torch import save_file

        self.backbone.save_pretrained(path, safe_serialization=safe_serialization)
        save_file(
            {k: v.contiguous() for k, v in self.head.state_dict().items()}, str(Path(path) / VALUE_HEAD_FILE)
        )

    def scores(self, batch: Any) -> torch.Tensor:
        """The head read at every token: ``(B, T)``, position ``t`` holds the score of the tokens up to and
        including ``t`` (what a reward model reads at a conversation's last token)."""
        hidden_B_T_H = self.backbone(
            input_ids=batch.token_ids_B_T, use_cache=False, **batch.model_inputs()
        ).last_hidden_state
        return self.head(hidden_B_T_H).squeeze(-1).float()

    def forward(self, batch: Any) -> torch.Tensor:
        return torch.nn.functional.pad(self.scores(batch)[:, :-1], (1, 0))
