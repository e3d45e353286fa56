"""The Gemma 3 tokenizer on the `tokenizers` library: from a tokenizer.json, from a GGUF vocabulary, or a
512-token `tiny` one for the tiny preset; plus the Gemma chat template and streaming decode.

Gemma's vocabulary is SentencePiece BPE: spaces become "▁", pieces merge by score, and characters outside
the vocabulary fall back to <0xNN> byte tokens, so any text round-trips (except a literal "▁", which
decodes as a space, as in SentencePiece itself).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE

from model.errors import UserError
from model.files import write_atomic

SPACE = "▁"
BOS, EOS, UNK, PAD = "<bos>", "<eos>", "<unk>", "<pad>"
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"

# GGUF / SentencePiece piece types.
NORMAL, CONTROL, USER_DEFINED, BYTE = 1, 3, 4, 6

# Bump when the GGUF → tokenizer.json build changes, so stale caches are rebuilt.
GGUF_BUILD_VERSION = 1


@dataclass(frozen=True)
class Vocabulary:
    """A SentencePiece vocabulary: piece i has score scores[i] and type types[i]."""
    pieces: list[str]
    scores: list[float]
    types: list[int]


class GemmaTokenizer:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.bos_token_id = self._required_id(BOS)
        self.eos_token_ids = (self._required_id(EOS), self._required_id(END_OF_TURN))

    def _required_id(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise UserError(f"the tokenizer has no {token} token, so it is not a Gemma tokenizer",
                            "use the tokenizer.json that ships with the Gemma 3 model")
        return token_id

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "GemmaTokenizer":
        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as error:  # tokenizers raises a bare Exception for unreadable or malformed files
            raise UserError(f"cannot read tokenizer file {path}: {error}",
                            "re-download the model's tokenizer.json") from error

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> "GemmaTokenizer":
        """Build from the GGUF's vocabulary; the result is cached next to the GGUF (gguf's reader walks the
        262k-entry vocabulary in Python, many times slower than loading the cached tokenizer.json)."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"GGUF file {path} does not exist", "check the path, or re-download the .gguf file")
        cache = gguf_tokenizer_cache_path(path)
        if cache.exists():
            return cls.from_file(cache)
        tokenizer = cls(build_sentencepiece_bpe(read_gguf_vocabulary(path)))
        try:
            tokenizer.save(cache)
        except OSError:
            pass  # a read-only model folder only costs the rebuild next time
        return tokenizer

    @classmethod
    def tiny(cls) -> "GemmaTokenizer":
        return cls(build_sentencepiece_bpe(tiny_vocabulary()))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        # <bos> is added here rather than by the file's post-processor, so every tokenizer.json behaves alike.
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return [self.bos_token_id, *ids] if add_bos else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = False) -> "StreamDecoder":
        return StreamDecoder(self.tokenizer, skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return gemma_chat_text(messages, add_generation_prompt)

    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json atomically: a reader never sees half a file."""
        write_atomic(Path(path), self.tokenizer.to_str())


class StreamDecoder:
    """Text for a terminal, one token at a time: `push(id)` returns the newly printable text, holding back
    byte-fallback tokens until they complete a UTF-8 character (an emoji is several tokens)."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool) -> None:
        self.tokenizer = tokenizer
        self.stream = decoders.DecodeStream(skip_special_tokens=skip_special_tokens)

    def push(self, token_id: int) -> str:
        return self.stream.step(self.tokenizer, token_id) or ""


def gemma_chat_text(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """Gemma's chat template without the leading <bos> (encode adds it): a system message becomes the start
    of the first user turn, "assistant" is written "model", and turns must alternate user/model."""
    first_user_prefix = ""
    if messages and messages[0]["role"] == "system":
        first_user_prefix = messages[0]["content"] + "\n\n"
        messages = messages[1:]
    turns = []
    for index, message in enumerate(messages):
        role = {"assistant": "model"}.get(message["role"], message["role"])
        expected = "user" if index % 2 == 0 else "model"
        if role != expected:
            raise UserError(f"chat message {index + 1} has role {message['role']!r} where {expected!r} belongs",
                            "alternate user and assistant messages, with an optional system message first")
        prefix = first_user_prefix if index == 0 else ""
        turns.append(f"{START_OF_TURN}{role}\n{prefix}{message['content'].strip()}{END_OF_TURN}\n")
    if add_generation_prompt:
        turns.append(f"{START_OF_TURN}model\n")
    return "".join(turns)


def build_sentencepiece_bpe(vocabulary: Vocabulary) -> Tokenizer:
    """SentencePiece BPE as a `tokenizers` pipeline: control pieces are special tokens, user-defined pieces
    ("\\n", runs of spaces, HTML tags) are matched whole before BPE, as SentencePiece does."""
    pieces = [sentencepiece_text(piece) for piece in vocabulary.pieces]
    bpe = BPE({piece: index for index, piece in enumerate(pieces)}, merges_by_score(pieces, vocabulary),
              unk_token=UNK, fuse_unk=True, byte_fallback=True)
    tokenizer = Tokenizer(bpe)
    tokenizer.normalizer = normalizers.Replace(" ", SPACE)
    tokenizer.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    control = [piece for piece, kind in zip(pieces, vocabulary.types) if kind == CONTROL]
    user_defined = [piece for piece, kind in zip(pieces, vocabulary.types) if kind == USER_DEFINED]
    tokenizer.add_special_tokens([AddedToken(piece, special=True, normalized=False) for piece in control])
    tokenizer.add_tokens([AddedToken(piece, special=False, normalized=True) for piece in user_defined])
    # For other runtimes reading the saved file (transformers.js, tokenizers): add <bos> like Gemma's own file.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, pieces.index(BOS))])
    return tokenizer


def sentencepiece_text(piece: str) -> str:
    """GGUF stores whitespace-only pieces with real spaces; the normalized text they must match has "▁"."""
    return piece.replace(" ", SPACE) if piece.strip(" ") == "" else piece


def merges_by_score(pieces: list[str], vocabulary: Vocabulary) -> list[tuple[str, str]]:
    """SentencePiece BPE merges the adjacent pair whose joined piece scores highest. As BPE merges: every
    split of a normal piece into two normal pieces, ranked by the joined piece's score (ties by the halves'
    ids, as transformers' SentencePieceExtractor orders them)."""
    normal_ids = {piece: index for index, (piece, kind) in enumerate(zip(pieces, vocabulary.types))
                  if kind == NORMAL}
    ranked = []
    for piece, index in normal_ids.items():
        for split in range(1, len(piece)):
            left, right = normal_ids.get(piece[:split]), normal_ids.get(piece[split:])
            if left is not None and right is not None:
                ranked.append((-vocabulary.scores[index], left, right))
    ranked.sort()
    return [(pieces[left], pieces[right]) for _, left, right in ranked]


def read_gguf_vocabulary(path: Path) -> Vocabulary:
    import gguf  # only GGUF users pay for the import

    try:
        fields = gguf.GGUFReader(path).fields
    except Exception as error:  # the reader raises many kinds (ValueError, IndexError, struct errors) on bad files
        raise UserError(f"cannot read GGUF file {path}: {type(error).__name__}: {error}",
                        "re-download the .gguf file") from None
    model_field = fields.get("tokenizer.ggml.model")
    vocabulary_fields = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")
    has_vocabulary = all(name in fields for name in vocabulary_fields)
    if model_field is None or model_field.contents() != "llama" or not has_vocabulary:
        raise UserError(f"{path} has no SentencePiece vocabulary (tokenizer.ggml.model 'llama' with tokens, scores "
                        "and token types)", "use a Gemma 3 GGUF file")
    vocabulary = Vocabulary(*(fields[name].contents() for name in vocabulary_fields))
    if not len(vocabulary.pieces) == len(vocabulary.scores) == len(vocabulary.types):
        raise UserError(f"{path} lists {len(vocabulary.pieces)} tokens but {len(vocabulary.scores)} scores and "
                        f"{len(vocabulary.types)} token types", "re-download the .gguf file")
    return vocabulary


def gguf_tokenizer_cache_path(gguf_path: Path) -> Path:
    """Keyed by the GGUF's size and modification time (hashing a large file would cost more than the build)."""
    stat = gguf_path.stat()
    key = f"{stat.st_size}-{stat.st_mtime_ns}-v{GGUF_BUILD_VERSION}"
    return gguf_path.with_name(f"{gguf_path.name}.tokenizer-{key}.json")


# The tiny vocabulary in Gemma's layout: control pieces at Gemma's ids (0-3, <mask> at 4, <unused*> up to 104,
# turn markers at 105/106), 256 byte pieces, then printable ASCII and common English word prefixes, ranked in
# that order, filling the rest of the 512 ids.
TINY_VOCAB_SIZE = 512
TINY_WORDS = ("the of and to in is that for it as with was on be by this are from or at have not which but "
              "all can").split()


def tiny_vocabulary() -> Vocabulary:
    control = [PAD, EOS, BOS, UNK, "<mask>", *(f"<unused{i}>" for i in range(100)), START_OF_TURN, END_OF_TURN]
    byte_pieces = [f"<0x{value:02X}>" for value in range(256)]
    normal = tiny_normal_pieces(TINY_VOCAB_SIZE - len(control) - len(byte_pieces))
    unranked = len(control) + len(byte_pieces)
    return Vocabulary(pieces=[*control, *byte_pieces, *normal],
                      scores=[0.0] * unranked + [-float(rank) for rank in range(len(normal))],
                      types=[CONTROL] * len(control) + [BYTE] * len(byte_pieces) + [NORMAL] * len(normal))


def tiny_normal_pieces(count: int) -> list[str]:
    """Single characters, then every prefix of "▁word" for TINY_WORDS: each longer piece is one merge away
    from a shorter one, so BPE can reach it."""
    pieces = [SPACE if chr(code) == " " else chr(code) for code in range(32, 127)]
    for word in TINY_WORDS:
        spaced = SPACE + word
        pieces += [spaced[:end] for end in range(2, len(spaced) + 1) if spaced[:end] not in pieces]
    if len(pieces) < count:
        raise AssertionError(f"TINY_WORDS yields {len(pieces)} pieces, {count} needed")
    return pieces[:count]
