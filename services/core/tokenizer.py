"""Byte-level BPE tokenizer (the ``tokenizers`` library) with the chat template's special tokens.

Chat template (one segment per message)::

    <|system|>You are ...<|end|><|user|>Hi<|end|><|assistant|>Hello!<|end|>

A generation prompt ends with ``<|assistant|>``; the model answers and ends its turn with ``<|end|>``.
For SFT the assistant mask covers each assistant message's content tokens *and* its ``<|end|>``
(the model must learn to stop), never the role markers or other turns.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

PAD, EOT, SYSTEM, USER, ASSISTANT, END = (
    "<|pad|>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
SPECIAL_TOKENS = [PAD, EOT, SYSTEM, USER, ASSISTANT, END]
ROLES = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}


class ChatTokenizer:
    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        ids = {s: tok.token_to_id(s) for s in SPECIAL_TOKENS}
        missing = [s for s, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"tokenizer lacks special tokens {missing}")
        self.pad_id, self.eot_id = ids[PAD], ids[EOT]
        self.end_id, self.assistant_id = ids[END], ids[ASSISTANT]
        self.role_ids = {r: ids[t] for r, t in ROLES.items()}
        self.special_ids = set(ids.values())

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 3072, min_frequency: int = 2) -> ChatTokenizer:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=SPECIAL_TOKENS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str | Path) -> ChatTokenizer:
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        return cls(Tokenizer.from_file(str(path)))

    @classmethod
    def from_str(cls, data: str) -> ChatTokenizer:
        return cls(Tokenizer.from_str(data))

    def save(self, path: str | Path) -> None:
        from chatrl.services.core.checkpoint import atomic_write_text

        atomic_write_text(Path(path), self.tok.to_str())

    def to_str(self) -> str:
        return self.tok.to_str()

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    # --- text -----------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    # --- chat template --------------------------------------------------------------------------
    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = False
                    ) -> tuple[list[int], list[int]]:
        """Token ids and the assistant mask (1 on assistant content + its ``<|end|>``)."""
        ids: list[int] = []
        mask: list[int] = []
        for i, m in enumerate(messages):
            role, content = m.get("role"), m.get("content")
            if role not in self.role_ids:
                raise ValueError(f"messages[{i}].role must be one of {sorted(self.role_ids)}, got {role!r}")
            if not isinstance(content, str):
                raise ValueError(f"messages[{i}].content must be a string")
            body = self.encode(content) + [self.end_id]
            ids += [self.role_ids[role]] + body
            flag = 1 if role == "assistant" else 0
            mask += [0] + [flag] * len(body)
        if add_generation_prompt:
            ids.append(self.assistant_id)
            mask.append(0)
        return ids, mask

    def prompt_ids(self, prompt: str | Sequence[dict], system: str | None = None) -> list[int]:
        """A chat prompt ready for generation (ends with ``<|assistant|>``): one user turn, or a conversation
        (``[{"role", "content"}, ...]`` ending with a user turn) rendered with the chat template."""
        if not isinstance(prompt, str):
            return self.render_chat(list(prompt), add_generation_prompt=True)[0]
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return self.render_chat(msgs, add_generation_prompt=True)[0]

    def response_text(self, ids: Sequence[int]) -> tuple[str, bool]:
        """Decode a generated response; returns (text, finished) where finished = ended with <|end|>."""
        ids = list(ids)
        finished = self.end_id in ids
        if finished:
            ids = ids[: ids.index(self.end_id)]
        return self.decode(ids), finished
