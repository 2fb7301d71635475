"""Streaming text: pieces must concatenate to the full decode, stop strings cut the text."""

from tandem.server.engine.detokenizer import IncrementalDetokenizer


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
