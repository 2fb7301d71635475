"""Log-probabilities carry each token's own bytes: joined, they are the text's UTF-8, where a
token decoded alone lost half-characters (U+FFFD) and SentencePiece's leading spaces."""

from types import SimpleNamespace

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
    sentencepiece = SimpleNamespace(all_special_ids=[0], convert_ids_to_tokens=lambda ids: [vocab[i] for i in ids])
    assert b"".join(TokenBytes(sentencepiece)([1, 5, 2, 3, 4])) == " Parisis世".encode()


def test_alternatives_that_read_alike_keep_the_likelier():
    """Two halves of characters both read U+FFFD: the legacy format keys alternatives by
    text, and the later, less likely one overwrote the first. The sampled token is always
    among them (it is not in the top here)."""
    pieces = {1: b"a", 2: b"\xe4", 3: b"\xe7"}
    legacy = completion_logprobs([TokenLogprob(1, -3.0, [(2, -1.0), (3, -2.0)])], pieces, TextOffsets())
    assert legacy["top_logprobs"] == [{"\ufffd": -1.0, "a": -3.0}]
