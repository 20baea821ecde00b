"""Byte-level tokenizer: token ids 0..255 are the UTF-8 bytes, then a few special tokens.

No vocabulary file is needed, so every checkpoint reads any text. Decoding replaces invalid UTF-8
(for example a sequence cut in the middle of a character) instead of failing.
"""

from __future__ import annotations

BOS = 256  # start of a document
EOS = 257  # end of a document / of a generated answer
PAD = 258  # padding in batches
SEP = 259  # separates a prompt from its answer in synthetic tasks
SPECIALS = {BOS: "<bos>", EOS: "<eos>", PAD: "<pad>", SEP: "<sep>"}
VOCAB_SIZE = 260


def encode(text: str, *, bos: bool = False) -> list[int]:
    """UTF-8 bytes of text, optionally after a <bos> token."""
    ids = list(text.encode("utf-8"))
    return [BOS, *ids] if bos else ids


def decode(ids: list[int]) -> str:
    """Text of the byte tokens in ids; special tokens are dropped."""
    return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


def token_label(token_id: int) -> str:
    """A short printable label for one token, for tables and hover text."""
    if token_id in SPECIALS:
        return SPECIALS[token_id]
    if not 0 <= token_id < 256:
        return f"<{token_id}>"
    char = chr(token_id)
    if char == "\n":
        return "\\n"
    if char == "\t":
        return "\\t"
    if char == " ":
        return "␣"
    if token_id < 32 or 127 <= token_id < 160:
        return f"\\x{token_id:02x}"
    return char if token_id < 128 else f"\\x{token_id:02x}"
