"""The tokenizer: the tiny one (fast), the chat template, file errors, and the real Gemma 3 vocabulary built
from the GGUF (marked `real`), checked against published ids, llama.cpp's merge rule and transformers."""

from __future__ import annotations

import json

import pytest

from model.errors import UserError
from model.tokenizer import BYTE, NORMAL, GemmaTokenizer, gguf_tokenizer_cache_path, read_gguf_vocabulary

VARIED_TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "def area(r):\n    return 3.14159 * r ** 2  # circle\n\tif x:\n\t\tpass\n",
    "สวัสดีครับ ยินดีต้อนรับ",
    "😀👍🏽 emoji 🇫🇷 family 👨‍👩‍👧 𐀀",
    "   leading, trailing and  double  spaces   ",
    "\t\ttabs\tand\n\n\nnewlines\r\n",
    "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    "日本語のテキスト、中文，Привет, мир! Ünïcödé façade",
    "",
]


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return GemmaTokenizer.tiny()


# --- tiny tokenizer --------------------------------------------------------------------------------------

def test_tiny_has_gemma_special_ids_and_512_tokens(tiny_tokenizer):
    token_ids = {token: tiny_tokenizer.tokenizer.token_to_id(token)
                 for token in ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>")}
    assert token_ids == {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<start_of_turn>": 105, "<end_of_turn>": 106}
    assert tiny_tokenizer.vocab_size == 512
    assert tiny_tokenizer.bos_token_id == 2
    assert tiny_tokenizer.eos_token_ids == (1, 106)


@pytest.mark.parametrize("text", VARIED_TEXTS)
def test_tiny_round_trips_any_text(tiny_tokenizer, text):
    ids = tiny_tokenizer.encode(text, add_bos=False)
    assert max(ids, default=0) < 512
    assert tiny_tokenizer.decode(ids) == text


def test_tiny_merges_words_and_falls_back_to_bytes(tiny_tokenizer):
    the = tiny_tokenizer.tokenizer.token_to_id("▁the")
    assert tiny_tokenizer.encode(" the the") == [2, the, the]
    # "😀" is F0 9F 98 80 in UTF-8; <0x00> has id 107.
    assert tiny_tokenizer.encode("😀", add_bos=False) == [107 + 0xF0, 107 + 0x9F, 107 + 0x98, 107 + 0x80]


def test_tiny_is_built_identically_every_time(tiny_tokenizer):
    assert GemmaTokenizer.tiny().tokenizer.to_str() == tiny_tokenizer.tokenizer.to_str()


def test_special_tokens_are_matched_whole_and_can_be_skipped(tiny_tokenizer):
    ids = tiny_tokenizer.encode("<start_of_turn>the<end_of_turn>")
    assert ids == [2, 105, *tiny_tokenizer.encode("the", add_bos=False), 106]
    assert tiny_tokenizer.decode(ids) == "<bos><start_of_turn>the<end_of_turn>"
    assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == "the"


def test_stream_decoder_holds_back_incomplete_utf8(tiny_tokenizer):
    stream = tiny_tokenizer.stream_decoder()
    pieces = [stream.push(token_id) for token_id in tiny_tokenizer.encode("a 😀 b", add_bos=False)]
    assert pieces == ["a", " ", "", "", "", "😀", " b"]


# --- chat template ---------------------------------------------------------------------------------------

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "  What is 2+2? "},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
]


def test_chat_template_matches_gemma(tiny_tokenizer):
    text = tiny_tokenizer.apply_chat_template(CONVERSATION)
    assert text == ("<start_of_turn>user\nYou are terse.\n\nWhat is 2+2?<end_of_turn>\n"
                    "<start_of_turn>model\n4<end_of_turn>\n"
                    "<start_of_turn>user\nAnd 3+3?<end_of_turn>\n"
                    "<start_of_turn>model\n")
    assert tiny_tokenizer.encode(text)[:2] == [2, 105]


def test_chat_template_without_generation_prompt(tiny_tokenizer):
    text = tiny_tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=False)
    assert text == "<start_of_turn>user\nHi<end_of_turn>\n"


def test_chat_template_rejects_roles_out_of_turn(tiny_tokenizer):
    with pytest.raises(UserError, match="role 'assistant'"):
        tiny_tokenizer.apply_chat_template([{"role": "assistant", "content": "Hi"}])


# --- files -----------------------------------------------------------------------------------------------

def test_save_then_from_file_gives_the_same_ids(tiny_tokenizer, tmp_path):
    path = tmp_path / "tokenizer.json"
    tiny_tokenizer.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]  # no temporary file left behind
    assert GemmaTokenizer.from_file(path).encode(VARIED_TEXTS[2]) == tiny_tokenizer.encode(VARIED_TEXTS[2])


def test_unparsable_tokenizer_file_is_a_user_error(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text('{"version": "1.0", "model": ')
    with pytest.raises(UserError, match="tokenizer.json") as error:
        GemmaTokenizer.from_file(path)
    assert "re-download" in error.value.fix


def test_missing_tokenizer_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="missing.json"):
        GemmaTokenizer.from_file(tmp_path / "missing.json")


def test_tokenizer_without_gemma_tokens_is_a_user_error(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}}))
    with pytest.raises(UserError, match="no <bos> token"):
        GemmaTokenizer.from_file(path)


def test_missing_gguf_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="missing.gguf"):
        GemmaTokenizer.from_gguf(tmp_path / "missing.gguf")


# --- the real Gemma 3 vocabulary, from the GGUF ----------------------------------------------------------

@pytest.fixture(scope="module")
def gguf_path():
    from model.weights import default_gguf_path
    return default_gguf_path()


@pytest.fixture(scope="module")
def gemma_tokenizer(gguf_path):
    return GemmaTokenizer.from_gguf(gguf_path)


@pytest.fixture(scope="module")
def gguf_vocabulary(gguf_path):
    return read_gguf_vocabulary(gguf_path)


@pytest.fixture(scope="module")
def transformers_tokenizer(gguf_path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


# Ids that Gemma 3/4 tokenizer ports checked against llama.cpp publish for these texts (no <bos>; the turn-marker
# line written in Gemma 3's markup).
PUBLISHED_IDS = {
    "Hello world": [9259, 1902],
    "状態を見て判断する。": [34593, 90166, 38303, 4042, 236924],
    "alpha\n\nbeta": [2482, 108, 3357],
    "line1\nline2": [1257, 236770, 107, 1257, 236778],
    "tab\there": [4823, 255968, 8472],
    "café 中文 👋": [123125, 236859, 17346, 237364, 155818],
    "  spaced   text": [138, 169862, 139, 1005],
    "x += 42; // code": [236781, 3323, 236743, 236812, 236778, 236793, 973, 3393],
    "<start_of_turn>user\nHi<end_of_turn>": [105, 2364, 107, 10979, 106],
    "\U0001F600": [242398],
    "\U00010000": [478, 382, 366, 366],  # not in the vocabulary: <0xF0> <0x90> <0x80> <0x80>
}


@pytest.mark.real
def test_gemma_vocabulary_ids(gemma_tokenizer):
    assert gemma_tokenizer.vocab_size == 262_144
    assert gemma_tokenizer.bos_token_id == 2
    assert gemma_tokenizer.eos_token_ids == (1, 106)
    assert gemma_tokenizer.encode("Hello world") == [2, 9259, 1902]


@pytest.mark.real
@pytest.mark.parametrize("text", PUBLISHED_IDS)
def test_gguf_tokenizer_gives_published_ids(gemma_tokenizer, text):
    assert gemma_tokenizer.encode(text, add_bos=False) == PUBLISHED_IDS[text]


@pytest.mark.real
@pytest.mark.parametrize("text", VARIED_TEXTS)
def test_gguf_tokenizer_round_trips(gemma_tokenizer, text):
    assert gemma_tokenizer.decode(gemma_tokenizer.encode(text, add_bos=False)) == text


def piece_ids(vocabulary, kind: int) -> dict[str, int]:
    return {piece: index for index, (piece, piece_kind) in enumerate(zip(vocabulary.pieces, vocabulary.types))
            if piece_kind == kind}


def llama_cpp_spm_ids(text: str, vocabulary) -> list[int]:
    """llama.cpp's SentencePiece tokenizer, as an independent reference: from single characters, merge the
    adjacent pair whose joined piece has the highest score (leftmost on ties); unknown pieces become bytes.
    Only for text without user-defined pieces (newlines, runs of spaces, tabs): llama.cpp splits those off first."""
    normal, byte_ids = piece_ids(vocabulary, NORMAL), piece_ids(vocabulary, BYTE)
    symbols = list(text.replace(" ", "▁"))
    while True:
        candidates = [(-vocabulary.scores[normal[left + right]], position)
                      for position, (left, right) in enumerate(zip(symbols, symbols[1:])) if left + right in normal]
        if not candidates:
            break
        _, position = min(candidates)
        symbols[position:position + 2] = [symbols[position] + symbols[position + 1]]
    ids = []
    for symbol in symbols:
        ids += [normal[symbol]] if symbol in normal else [byte_ids[f"<0x{byte:02X}>"] for byte in symbol.encode()]
    return ids


SINGLE_LINE_TEXTS = [
    "The history of computing is a story of abstraction layered upon abstraction.",
    "for (int i = 0; i < n; ++i) { sum += a[i]; } // accumulate",
    "สวัสดีครับ ยินดีต้อนรับ สู่ประเทศไทย",
    "😀👍🏽 emoji 🇫🇷 family 👨‍👩‍👧 𐀀",
    "Die Straße ist schön, n'est-ce pas? ¿Qué tal? Привет, мир! مرحبا بالعالم नमस्ते दुनिया",
    "Ünïcödé façade naïve coöperate " + "x" * 40,
    "import torch; model = torch.compile(model, fullgraph=True)",
]


@pytest.mark.real
@pytest.mark.parametrize("text", SINGLE_LINE_TEXTS)
def test_gguf_tokenizer_merges_like_llama_cpp(gemma_tokenizer, gguf_vocabulary, text):
    assert gemma_tokenizer.encode(text, add_bos=False) == llama_cpp_spm_ids(text, gguf_vocabulary)


@pytest.mark.real
def test_gguf_tokenizer_cache_equals_a_fresh_build(gemma_tokenizer, gguf_path, gguf_vocabulary):
    from model.tokenizer import build_sentencepiece_bpe
    cached = gguf_tokenizer_cache_path(gguf_path)
    assert cached.exists()
    assert cached.read_text(encoding="utf-8") == build_sentencepiece_bpe(gguf_vocabulary).to_str()


# Where transformers 4.57.6's GGUF conversion (a Unigram model over the GGUF scores) is exact: pieces that
# cannot be split further, and user-defined whitespace/markup pieces.
TRANSFORMERS_AGREES = [
    "😀👍🏽 🇫🇷 👨‍👩‍👧 𐀀",
    "  \t \n\n   \t\t\n",
    "12345 + 678 = 7023",
    "日本語",
    "a b c",
    "<div></div>",
    "<start_of_turn>\n<end_of_turn>\n",
]


@pytest.mark.real
@pytest.mark.parametrize("text", TRANSFORMERS_AGREES)
def test_gguf_tokenizer_agrees_with_transformers(gemma_tokenizer, transformers_tokenizer, text):
    ids = gemma_tokenizer.encode(text)
    assert ids == transformers_tokenizer.encode(text)
    assert gemma_tokenizer.decode(ids[1:]) == text


# Elsewhere it splits words: a Unigram model reads the GGUF's scores (minus the BPE merge rank) as
# log-probabilities, so short early-merged pieces win. Gemma's tokenizer is BPE; ours gives the published ids
# and llama.cpp's merges above, so these pin transformers' divergence: (ours, transformers').
TRANSFORMERS_DISAGREES = {
    "Hello world": ([9259, 1902], [9259, 515, 504, 671]),
    " the": ([506], [494, 499]),
    "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n": (
        [105, 2364, 107, 10979, 106, 107, 105, 4368, 107],
        [105, 605, 497, 107, 10979, 106, 107, 105, 1901, 535, 107]),
    "สวัสดีครับ ยินดีต้อนรับ": (
        [49366, 45451, 23474, 13255, 15407, 237235, 57868, 7031],
        [49366, 16250, 4956, 23474, 13255, 15407, 88110, 17377, 7031]),
    "2  # circle": ([236778, 138, 236865, 10059], [236778, 236743, 997, 505, 1648, 519]),
    "\t\ttabs\tand": ([255969, 39218, 255968, 624], [255969, 1246, 1886, 255968, 624]),
}


@pytest.mark.real
@pytest.mark.parametrize("text", TRANSFORMERS_DISAGREES)
def test_transformers_unigram_conversion_splits_gemma_words(gemma_tokenizer, transformers_tokenizer, text):
    ours, theirs = TRANSFORMERS_DISAGREES[text]
    assert gemma_tokenizer.encode(text, add_bos=False) == ours
    assert transformers_tokenizer.encode(text, add_special_tokens=False) == theirs
