"""CLIP's byte-level BPE tokenizer (OpenAI CLIP / open_clip `SimpleTokenizer` semantics), without
importing open_clip.

Why not open_clip's own class: `import open_clip` imports its whole package (CoCa, the Hugging
Face text towers through `transformers`, torchvision transforms), measured at 3.0 s of the 4.7 s
`import runtime` on a warm CPU machine and most of a 13 s cold import on the GPU machine, for a
tokenizer of a page. The vocabulary is open_clip's own file, read from its installed package
folder (located without importing it), and a test checks this class against open_clip's on
hundreds of strings.

Text is cleaned as CLIP does (ftfy, HTML unescaped twice, whitespace collapsed, lower case), split
by CLIP's pattern (letters, single digits, other non-space runs, English contractions), each piece
turned into byte characters and merged by BPE rank; `</w>` marks a word end.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
from functools import lru_cache
from pathlib import Path

import ftfy
import regex

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
MERGES = 49152 - 256 - 2  # merges used by CLIP's vocabulary of 49408 tokens
START, END = "<start_of_text>", "<end_of_text>"


def default_vocab_path() -> Path:
    """open_clip's BPE vocabulary file, found without importing open_clip."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("open_clip_torch is not installed: CLIP's BPE vocabulary ships with it")
    path = Path(next(iter(spec.submodule_search_locations))) / VOCAB_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: CLIP's BPE vocabulary is missing from the open_clip package")
    return path


@lru_cache(maxsize=1)
def byte_alphabet() -> dict[int, str]:
    """Each byte → a printable character: printable Latin-1 bytes map to themselves, the rest
    (control characters, space, …) to code points from 256 up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):  # insertion order, printable bytes first, is the vocabulary's order
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def clean(text: str) -> str:
    """CLIP's text cleaning: ftfy, HTML entities (twice), collapsed whitespace, lower case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


class ClipBPE:
    """Encode text to CLIP token ids and back; `sot_token_id`/`eot_token_id` as open_clip names them."""

    def __init__(self, vocab_path: str | Path | None = None) -> None:
        lines = gzip.open(vocab_path or default_vocab_path()).read().decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1 : MERGES + 1]]
        alphabet = list(byte_alphabet().values())
        tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges] + [START, END]
        self.encoder = {t: i for i, t in enumerate(tokens)}
        self.decoder = dict(enumerate(tokens))
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.byte_encoder = byte_alphabet()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.sot_token_id, self.eot_token_id = self.encoder[START], self.encoder[END]
        self.vocab_size = len(tokens)
        self.pattern = regex.compile(
            rf"{START}|{END}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+", regex.IGNORECASE)
        self._merge = lru_cache(maxsize=1 << 16)(self._merge_word)

    def _merge_word(self, word: str) -> tuple[str, ...]:
        """The BPE pieces of one pre-split word (its characters, the last marked `</w>`)."""
        if word in (START, END):
            return (word,)
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            pair = min(zip(parts, parts[1:], strict=False), key=lambda p: self.ranks.get(p, MERGES))
            if pair not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):  # merge every occurrence of the best pair, left to right
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(parts)

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in self.pattern.findall(clean(text)):
            chars = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[p] for p in self._merge(chars))
        return ids

    def decode(self, ids: list[int]) -> str:
        text = "".join(self.decoder[i] for i in ids)
        return bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace").replace("</w>", " ")
