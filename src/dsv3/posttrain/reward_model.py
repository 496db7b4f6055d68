"""A model-based reward (report §5.2.1: a reward model trained from DeepSeek-V3 checkpoints, for questions without
a rule to check them): a checkpoint with a scalar head scores each conversation.

The checkpoint is what transformers writes for ``DeepseekV3ForSequenceClassification`` with one label (the usual
reward-model layout, e.g. TRL's reward trainer): the decoder's weights and ``score.weight`` (1, hidden), read, as
transformers reads it, at the conversation's last token that is not the config's ``pad_token_id`` (DeepSeek-V3's
tokenizer pads with its end-of-sentence token, which closes each assistant turn: the score is then the one
before it). dsv3 loads it with that head in place of the LM head
(:func:`dsv3.load_pretrained` with ``head="score"``), so the model's logits are every position's score. A
conversation is the prompt as the user's turn and the completion as the assistant's, rendered with the reward
model's own chat template (its tokenizer_config.json, else dsv3's fallback format).

``--reward rm:PATH`` in ``dsv3 grpo`` scores with :class:`RewardModelReward`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..checkpoint import load_pretrained
from ..data import Tokenizer
from ..inference.chat import ChatTemplate


class RewardModelReward:
    """``reward(prompts, completions, answers)``: the reward model's score of each (prompt, completion)
    conversation (``answers`` unused), computed in batches of ``batch_size`` right-padded sequences."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 batch_size: int = 16):
        path = Path(path)
        device = torch.device(device)
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        self.model = load_pretrained(path, device=device, dtype=dtype, head="score").eval()
        if self.model.lm_head.out_features != 1:
            raise ValueError(f"{path}: a reward model has one label; this classifier has "
                             f"{self.model.lm_head.out_features}")
        self.tokenizer = Tokenizer.load(path)
        self.template = ChatTemplate.load(self.tokenizer, path)
        self.device, self.batch_size = device, batch_size
        self.max_len = self.model.config.max_position_embeddings
        self.pad_id: int | None = json.loads((path / "config.json").read_text()).get("pad_token_id")

    def encode(self, prompt: str, completion: str) -> list[int]:
        tokens = self.template.encode([{"role": "user", "content": prompt},
                                       {"role": "assistant", "content": completion}], add_generation_prompt=False)
        return tokens[-self.max_len:]  # the end is what the score reads

    def _read_at(self, tokens: list[int]) -> int:
        """Where the score is read: the last token that is not padding (transformers' pooling), else 0."""
        if self.pad_id is None:
            return len(tokens) - 1
        return next((i for i in range(len(tokens) - 1, -1, -1) if tokens[i] != self.pad_id), 0)

    @torch.no_grad()
    def score_tokens(self, sequences: list[list[int]]) -> list[float]:
        """The score of each sequence (read where :meth:`_read_at` says)."""
        out: list[float] = []
        for start in range(0, len(sequences), self.batch_size):
            chunk = sequences[start : start + self.batch_size]
            lengths = torch.tensor([len(s) for s in chunk], device=self.device)
            if int(lengths.min()) == 0:
                raise ValueError("a reward model cannot score an empty sequence")
            tokens = torch.zeros(len(chunk), int(lengths.max()), dtype=torch.long)
            for i, s in enumerate(chunk):  # right padding: causal attention keeps it out of the real positions
                tokens[i, : len(s)] = torch.tensor(s)
            at = torch.tensor([self._read_at(s) for s in chunk], device=self.device)
            scores = self.model(tokens.to(self.device)).logits[..., 0]  # (B, S)
            out += scores.gather(1, at.unsqueeze(1)).squeeze(1).float().tolist()
        return out

    def __call__(self, prompts: list[str], completions: list[str], answers: list[str | None]) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"prompts and completions differ in length: {len(prompts)}, {len(completions)}")
        return self.score_tokens([self.encode(p, c) for p, c in zip(prompts, completions)])
