"""Streaming text: pieces must concatenate to the full decode, stop strings cut the text."""

import copy

from tandem.server.engine.detokenizer import IncrementalDetokenizer, decode_text


def stream(tokenizer, prompt_ids, output_ids, stop=()):
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, list(stop))
    pieces, stopped = [], False
    for t in output_ids:
        stopped = detok.add(t)
        pieces.append(detok.take(finished=stopped))
        if stopped:
            break
    if not stopped:
        pieces.append(detok.take(finished=True))
    return pieces, stopped


def test_pieces_join_to_the_full_text_with_spaces_and_multibyte(smollm2_tokenizer):
    text = " Héllo wörld — 東京 is big 🎉🎉, isn't it?\n  Yes."
    prompt = smollm2_tokenizer("Say:").input_ids
    ids = smollm2_tokenizer(text, add_special_tokens=False).input_ids
    pieces, _ = stream(smollm2_tokenizer, prompt, ids)
    assert "".join(pieces) == smollm2_tokenizer.decode(ids)
    assert all("\ufffd" not in p for p in pieces)


def test_emoji_split_over_byte_tokens_is_never_emitted_broken(smollm2_tokenizer):
    ids = smollm2_tokenizer("🎉", add_special_tokens=False).input_ids
    assert len(ids) > 1  # byte-level pieces
    pieces, _ = stream(smollm2_tokenizer, [1], ids)
    assert pieces[:-1] == [""] * (len(ids) - 1) or "".join(pieces) == "🎉"
    assert "".join(pieces) == "🎉"


def test_stop_string_cuts_the_text_and_is_never_streamed(smollm2_tokenizer):
    ids = smollm2_tokenizer("one two three four five", add_special_tokens=False).input_ids
    pieces, stopped = stream(smollm2_tokenizer, [1], ids, stop=["three f"])
    assert stopped
    assert "".join(pieces) == "one two "
    assert all("thr" not in p for p in pieces)


def test_special_tokens_are_not_in_the_text(smollm2_tokenizer):
    eos = smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = smollm2_tokenizer("Paris.", add_special_tokens=False).input_ids + [eos]
    pieces, _ = stream(smollm2_tokenizer, [1], ids)
    assert "".join(pieces) == "Paris."


def test_a_tokenizer_that_cleans_up_spaces_streams_the_text_as_generated(smollm2_tokenizer):
    """Llama 3's tokenizers clean up spaces before punctuation on decode: " x != y" came back
    " x!= y", and where the clean-up broke the windowed decode's prefix, characters vanished
    (" it 's" streamed as " it '")."""
    tokenizer = copy.deepcopy(smollm2_tokenizer)
    tokenizer.clean_up_tokenization_spaces = True
    # transformers 5 skips the clean-up for byte-level BPE unless forced; 4.x (which our
    # requirements allow) applies it to Llama 3's.
    tokenizer.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = True
    text = " if x != y . it 's done ?"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) != text  # the clean-up is on
    pieces, _ = stream(tokenizer, [1], ids)
    assert "".join(pieces) == text == decode_text(tokenizer, ids)
    pieces, stopped = stream(tokenizer, [1], ids, stop=[" !="])
    assert stopped and "".join(pieces) == " if x"
