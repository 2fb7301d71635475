"""Log-probabilities carry each token's own bytes: joined, they are the text's UTF-8, where a
token decoded alone lost half-characters (U+FFFD) and SentencePiece's leading spaces."""

import copy
from types import SimpleNamespace

from tokenizers import AddedToken

from tandem.server.engine.detokenizer import decode_text
from tandem.server.engine.outputs import TokenLogprob
from tandem.server.engine.token_bytes import TokenBytes
from tandem.server.openai_api.responses import TextOffsets, chat_logprobs, completion_logprobs

TEXT = "Héllo 世界 🙂 Paris"


def test_byte_level_pieces_join_into_the_text_and_offsets_count_whole_characters(smollm2_tokenizer):
    ids = smollm2_tokenizer.encode(TEXT)
    pieces = dict(zip(ids, TokenBytes(smollm2_tokenizer)(ids)))
    logprobs = [TokenLogprob(t, -1.0, []) for t in ids]
    content = chat_logprobs(logprobs, pieces)["content"]
    assert b"".join(bytes(t["bytes"]) for t in content) == TEXT.encode()
    assert "\ufffd" in [t["token"] for t in content]  # 世 and 界 are split over tokens here
    legacy = completion_logprobs(logprobs, pieces, TextOffsets())
    # Each token's start in TEXT; a token inside a character starts where that character does.
    starts = [TEXT.encode()[: sum(len(pieces[t]) for t in ids[:i])].decode(errors="ignore") for i in range(len(ids))]
    assert legacy["text_offset"] == [len(s) for s in starts]


def test_special_tokens_have_no_bytes_and_sentencepiece_pieces_keep_their_spaces(smollm2_tokenizer):
    special = smollm2_tokenizer.all_special_ids[0]
    assert TokenBytes(smollm2_tokenizer)([special]) == [b""]
    vocab = {1: "\u2581Paris", 2: "<0xE4>", 3: "<0xB8>", 4: "<0x96>", 5: "is"}
    sentencepiece = SimpleNamespace(
        all_special_ids=[0], added_tokens_decoder={}, convert_ids_to_tokens=lambda ids: [vocab[i] for i in ids]
    )
    assert b"".join(TokenBytes(sentencepiece)([1, 5, 2, 3, 4])) == " Parisis世".encode()


def test_alternatives_that_read_alike_keep_the_likelier():
    """Two halves of characters both read U+FFFD: the legacy format keys alternatives by
    text, and the later, less likely one overwrote the first. The sampled token is always
    among them (it is not in the top here)."""
    pieces = {1: b"a", 2: b"\xe4", 3: b"\xe7"}
    legacy = completion_logprobs([TokenLogprob(1, -3.0, [(2, -1.0), (3, -2.0)])], pieces, TextOffsets())
    assert legacy["top_logprobs"] == [{"\ufffd": -1.0, "a": -3.0}]


def test_an_added_token_marked_special_has_no_bytes_as_it_has_no_text(smollm2_tokenizer):
    """An added token marked special but not listed among the special tokens (Llama 3's
    <|python_tag|>) is skipped by the detokenizer: its bytes were in the log-probabilities,
    text the output never had, and every later text_offset was shifted by them."""
    tokenizer = copy.deepcopy(smollm2_tokenizer)
    tokenizer.add_tokens([AddedToken("<tag>", special=True)])
    tag = tokenizer.convert_tokens_to_ids("<tag>")
    assert tag not in tokenizer.all_special_ids
    ids = [tag, *tokenizer.encode("Paris is", add_special_tokens=False)]
    text = decode_text(tokenizer, ids)
    assert text == "Paris is"
    pieces = TokenBytes(tokenizer)(ids)
    assert pieces[0] == b"" and b"".join(pieces) == text.encode()
