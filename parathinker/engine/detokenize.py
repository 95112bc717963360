"""Incremental detokenization for streaming: token ids in, new text out, O(new tokens) per call.

Two strategies, one `if`:
- byte-level BPE (Qwen2, Llama 3, DeepSeek-R1-Distill: the checkpoints this project serves):
  each token maps to its bytes exactly as the tokenizers library's ByteLevel decoder does, and an
  incremental UTF-8 decoder turns them into text. Only an incomplete character at the very end is
  held back; invalid bytes become U+FFFD at once, as in `tokenizer.decode`.
- any other tokenizer: decode a short window (the tokens since `prefix_offset`) and emit what it
  adds beyond the text of its first part, holding back text that ends in U+FFFD (vLLM's method).
Either way the concatenation of everything emitted, `flush` included, equals
`tokenizer.decode(all_ids, skip_special_tokens=False)` (tested on the tiny tokenizer).
"""

from __future__ import annotations

import codecs
from functools import lru_cache
from typing import Any

REPLACEMENT = "\ufffd"


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode table (the ByteLevel pre-tokenizer's alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = list(bs), 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def is_byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return type(decoder).__name__ == "ByteLevel"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.byte_level = is_byte_level(tokenizer)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.token_ids: list[int] = []
        self.prefix_offset = 0  # window start (fallback strategy)
        self.read_offset = 0  # tokens already turned into emitted text (fallback strategy)

    def add(self, new_ids: list[int]) -> str:
        """Append tokens; return the text they complete (possibly empty)."""
        if self.byte_level:
            return self._utf8.decode(self._bytes(new_ids))
        self.token_ids += new_ids
        return self._emit_window(final=False)

    def flush(self) -> str:
        """Whatever is still held back (call once the sequence has ended)."""
        if self.byte_level:
            return self._utf8.decode(b"", final=True)
        return self._emit_window(final=True)

    def _bytes(self, ids: list[int]) -> bytes:
        table = _unicode_to_byte()
        out = bytearray()
        for token in self.tokenizer.convert_ids_to_tokens(ids):
            token = token or ""
            try:  # as tokenizers' ByteLevel decoder: a token outside the alphabet is raw UTF-8
                out += bytes(table[c] for c in token)
            except KeyError:
                out += token.encode("utf-8")
        return bytes(out)

    def _emit_window(self, final: bool) -> str:
        if self.read_offset == len(self.token_ids):
            return ""
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
        prefix_text = decode(self.token_ids[self.prefix_offset:self.read_offset])
        text = decode(self.token_ids[self.prefix_offset:])
        if not final and (len(text) <= len(prefix_text) or text.endswith(REPLACEMENT)):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        return text[len(prefix_text):]


def token_bytes(tokenizer: Any, ids: list[int]) -> list[bytes]:
    """Each token's own bytes (byte-level BPE: exact, as its decoder; otherwise the token
    decoded alone, in UTF-8)."""
    if not is_byte_level(tokenizer):
        return [tokenizer.decode([i], skip_special_tokens=False).encode("utf-8") for i in ids]
    d = IncrementalDetokenizer(tokenizer)
    return [d._bytes([i]) for i in ids]
