"""The LLaMA tokenizer the released ST-LLM uses: transformers 4.28's `LlamaTokenizer` (`use_fast=False`).

That tokenizer runs SentencePiece itself on each stretch of text between special tokens, so its ids are those
of `SentencePieceProcessor.encode` on the directory's `tokenizer.model`. `load_llm_tokenizer` loads this one
whenever a directory has that file. The fast tokenizer that transformers 5 builds from the same file is a
different function: it prepends SentencePiece's word-start piece only when the text does not already start
with a space, so text that does (' A red ball.', ' ') gets other ids (tests/test_conversation.py shows it on a
SentencePiece model trained in the test). Agreement on a test corpus could not show agreement on all of
Vicuna's 32,000 pieces and all inputs; running SentencePiece is the released function by construction, and
tokenising a prompt costs nothing next to decoding its video.

transformers 5 has no slow LLaMA class. `SentencePieceBackend` with `legacy=True` tokenises as 4.28's class
did; its decoding, though, joins the pieces as text, which would leave byte pieces such as `<0x0A>` (a newline)
in the output. `LlamaTokenizer` below decodes through SentencePiece, as 4.28's did. It keeps the name so that a
saved directory says `LlamaTokenizer` and loads anywhere a Vicuna tokenizer does.
"""

from __future__ import annotations

from transformers.tokenization_utils_sentencepiece import SentencePieceBackend


class LlamaTokenizer(SentencePieceBackend):
  """SentencePiece between special tokens (load with `legacy=True`), decoded through SentencePiece."""

  def convert_tokens_to_string(self, tokens: list[str]) -> str:
    """4.28's rule: each run of pieces decoded by SentencePiece and special tokens kept as they are; a run that a
    special token ends (and that is not at the start) gets a space in front."""
    text, pieces, after_special = '', [], False
    for position, token in enumerate(tokens):
      if token in self.all_special_tokens:
        text += (' ' if position and not after_special else '') + self.sp_model.decode(pieces) + token
        pieces, after_special = [], True
      else:
        pieces.append(token)
        after_special = False
    return text + self.sp_model.decode(pieces)
