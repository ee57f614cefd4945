"""Incremental detokenisation and stop-string matching across token boundaries.

Text is released only when it is final: not a possible start of a stop string and not a
partial UTF-8 character (the tokenizer's U+FFFD). A stop string is cut out of the output.
"""

from __future__ import annotations


class IncrementalText:
    def __init__(self, tokenizer, stop: list[str], include_stop: bool = False) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.max_stop = max((len(s) for s in self.stop), default=0)
        self.include_stop = include_stop
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""  # all decoded text so far (stop string removed once hit)
        self.emitted = 0  # chars of self.text already released
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> None:
        """Append one token; sets `stopped` when a stop string completes."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if full.endswith("\ufffd"):
            return  # a multi-byte character is not complete yet
        start = len(self.text)
        self.text += full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        if self.stop:
            self._check_stop(max(0, start - self.max_stop + 1))

    def _check_stop(self, search_from: int) -> None:
        hits = [(i, s) for s in self.stop if (i := self.text.find(s, search_from)) >= 0]
        if not hits:
            return
        i, s = min(hits)
        self.text = self.text[: i + (len(s) if self.include_stop else 0)]
        self.emitted = min(self.emitted, len(self.text))
        self.stopped = True

    def flush(self, final: bool) -> str:
        """Text that is safe to release now (everything, once `final`)."""
        end = len(self.text)
        if not final and not self.stopped and self.stop:
            # hold back a tail that could still grow into a stop string
            for k in range(min(self.max_stop - 1, end - self.emitted), 0, -1):
                tail = self.text[end - k :]
                if any(s.startswith(tail) for s in self.stop):
                    end -= k
                    break
        out = self.text[self.emitted : end]
        self.emitted = end
        return out
