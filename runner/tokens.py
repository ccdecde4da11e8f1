"""The base model's tokenizer as the edge uses it: text or chat messages to token ids (with each
token's span), and ids back to each token's own text. Every adapter shares the base's tokenizer.
HF fast tokenizers are thread-safe; callers run these on a thread (they are CPU work)."""

from __future__ import annotations

from typing import Sequence

from jinja2 import TemplateError

from loraserve.scheduler.errors import InvalidArgument, NoChatTemplate

Spans = list[tuple[int, int]]
"""Each token's [start, end) in the text, in characters; (0, 0) for a token the tokenizer added."""


class Tokens:
    def __init__(self, tokenizer, model: str):
        """`tokenizer`: a transformers fast tokenizer; `model`: the base model's id (for errors)."""
        self._tok = tokenizer
        self.model = model

    @property
    def vocab_size(self) -> int:
        """Ids below this have a token (added tokens included)."""
        return len(self._tok)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self._tok, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        """A prompt's ids, with the special tokens the tokenizer adds to any text (a BOS, for many)."""
        return self._tok.encode(text, add_special_tokens=True)

    def render(self, messages: Sequence[tuple[str, str]]) -> str:
        """(role, content) pairs as the chat template writes them, ending where the assistant's
        answer begins."""
        if not self.has_chat_template:
            raise NoChatTemplate(self.model)
        try:
            return self._tok.apply_chat_template([{"role": r, "content": c} for r, c in messages],
                                                 add_generation_prompt=True, tokenize=False)
        except TemplateError as exc:  # templates raise for what they refuse (e.g. roles out of turn)
            raise InvalidArgument("messages", f"the chat template refused them: {exc}") from None

    def encode_chat(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        return self.spans(self.render(messages), chat=True)[0]

    def spans(self, text: str, chat: bool = False) -> tuple[list[int], Spans]:
        """`text`'s ids and spans. A rendered chat is tokenized as it is: its template wrote the
        special tokens it wants, so none are added."""
        enc = self._tok(text, add_special_tokens=not chat, return_offsets_mapping=True)
        return list(enc["input_ids"]), [(int(a), int(b)) for a, b in enc["offset_mapping"]]

    def texts(self, ids: Sequence[int]) -> list[str]:
        """Each id's text alone (a byte-level token may be part of a character: replaced by U+FFFD)."""
        return self._tok.batch_decode([[i] for i in ids])
