"""Training data is validated in full before a job starts: labels fall exactly on what the model
should learn, and every bad line is refused with its line number and a reason to act on."""

import json
import os
import tracemalloc
from pathlib import Path

import pytest

from tandem.server.errors import InvalidRequest, NotFound
from tandem.server.finetune.dataset import (
    IGNORE_INDEX,
    TrainingExample,
    parse_dataset,
    resolve_training_file,
    split_eval,
)

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Peru?"},
    {"role": "assistant", "content": "Lima."},
]


def jsonl(*rows) -> str:
    """One line per row: dicts as JSON, strings as they are (for broken lines)."""
    return "\n".join(row if isinstance(row, str) else json.dumps(row) for row in rows)


def only(data: str | bytes, tokenizer, max_seq_length: int = 512) -> TrainingExample:
    (example,) = parse_dataset(data, tokenizer, max_seq_length)
    return example


def refusal(data: str | bytes, tokenizer, max_seq_length: int = 512, **kwargs) -> str:
    with pytest.raises(InvalidRequest) as info:
        parse_dataset(data, tokenizer, max_seq_length, **kwargs)
    return str(info.value)


def labelled_spans(tokenizer, example: TrainingExample) -> list[str]:
    """The decoded runs of consecutive labelled tokens; each label must be its own input token."""
    spans, run = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label == IGNORE_INDEX:
            spans, run = (spans + [run] if run else spans), []
        else:
            assert label == token
            run.append(token)
    return [tokenizer.decode(span) for span in spans + ([run] if run else [])]


def render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False).input_ids


def test_prompt_completion_labels_the_completion_and_eos(smollm2_tokenizer):
    tok = smollm2_tokenizer
    example = only(jsonl({"prompt": "Say hi: ", "completion": "Hello there"}), tok)
    prompt = tok("Say hi: ").input_ids
    assert tuple(example.input_ids) == (*prompt, *tok("Hello there", add_special_tokens=False).input_ids, tok.eos_token_id)
    assert tuple(example.labels[: len(prompt)]) == (IGNORE_INDEX,) * len(prompt)
    assert labelled_spans(tok, example) == ["Hello there" + tok.eos_token]
    assert example.num_target_tokens == example.num_tokens - len(prompt)


def test_chat_trains_on_the_assistant_reply_after_the_servers_own_prompt(smollm2_tokenizer):
    tok = smollm2_tokenizer
    messages = CHAT[1:3]
    example = only(jsonl({"messages": messages}), tok)
    assert list(example.input_ids) == render(tok, messages, add_generation_prompt=False)
    assert labelled_spans(tok, example) == ["Paris.<|im_end|>"]
    # The tokens before the reply are exactly what the server sends the model for this chat.
    first = example.labels.index(next(label for label in example.labels if label != IGNORE_INDEX))
    assert list(example.input_ids[:first]) == render(tok, messages[:1], add_generation_prompt=True)
    assert tok.decode(example.input_ids[:first]).endswith("<|im_start|>assistant\n")


def test_multi_turn_chat_labels_every_assistant_turn_and_nothing_else(smollm2_tokenizer):
    example = only(jsonl({"messages": CHAT}), smollm2_tokenizer)
    assert labelled_spans(smollm2_tokenizer, example) == ["Paris.<|im_end|>", "Lima.<|im_end|>"]


def test_text_labels_every_token_but_the_first_and_ends_with_eos(smollm2_tokenizer):
    """Without the eos (TRL's SFTTrainer adds one) a model trained on documents never learnt
    to end one."""
    example = only(jsonl({"text": "The quick brown fox"}), smollm2_tokenizer)
    assert tuple(example.input_ids) == (*smollm2_tokenizer("The quick brown fox").input_ids, smollm2_tokenizer.eos_token_id)
    assert tuple(example.labels) == (IGNORE_INDEX, *example.input_ids[1:])
    assert example.num_target_tokens == example.num_tokens - 1
    # One eos, not two, when the text ends with it.
    assert only(jsonl({"text": "The quick brown fox<|im_end|>"}), smollm2_tokenizer).input_ids == example.input_ids


def test_a_file_may_mix_formats_and_blank_lines_are_skipped(smollm2_tokenizer):
    data = jsonl({"text": "one two"}, "", {"messages": CHAT[1:3]}, "   ", {"prompt": "a", "completion": "b"}, "")
    examples = parse_dataset(data.encode(), smollm2_tokenizer, 512)
    assert [labelled_spans(smollm2_tokenizer, e) for e in examples] == [[" two<|im_end|>"], ["Paris.<|im_end|>"], ["b<|im_end|>"]]


def test_every_invalid_line_is_listed_with_its_number_and_reason(smollm2_tokenizer):
    data = jsonl(
        {"prompt": "fine", "completion": "fine"},
        "",
        {"prompt": "a", "completion": 7},
        '{"prompt": "a" "completion": "b"}',
        {"prompt": "a", "completon": "b"},
        {"text": " ".join(["word"] * 40)},
    )
    assert refusal(data, smollm2_tokenizer, max_seq_length=32) == (
        "training data has 4 invalid lines: "
        'line 3: "completion" must be a string, got number; '
        "line 4: not valid JSON (Expecting ',' delimiter at column 16); "
        'line 5: missing "completion", unknown key "completon" (did you mean "completion"?); '
        "line 6: has 41 tokens, more than max_seq_length 32 (raise max_seq_length or shorten it)"
    )


@pytest.mark.parametrize(
    "line, reason",
    [
        ("[1, 2]", "not a JSON object, got array"),
        ({}, 'unknown format: expected "prompt" and "completion", "messages" or "text" keys, got none'),
        ({"txt": "hi"}, 'unknown format: expected "prompt" and "completion", "messages" or "text" keys, '
                        'got "txt" (did you mean "text"?)'),
        ({"prompt": "a", "completion": "b", "weight": 1}, 'unknown key "weight"'),
        ({"text": "a b", "prompt": "a"}, "mixes the prompt/completion and text formats: use one format per line"),
        ({"prompt": "a", "completion": " \n"}, '"completion" is empty'),
        ({"text": None}, '"text" must be a string, got null'),
        ({"messages": {"role": "user"}}, '"messages" must be a list, got object'),
        ({"messages": []}, '"messages" is empty'),
        ({"messages": ["hi"]}, 'messages[0] must be an object with "role" and "content", got string'),
        ({"messages": [{"role": "user", "text": "hi"}]}, 'messages[0]: missing "content", unknown key "text"'),
        ({"messages": [{"role": "bot", "content": "hi"}]}, 'messages[0].role must be one of system, user, assistant, '
                                                           'got "bot"'),
        ({"messages": [{"role": "user", "content": ""}]}, "messages[0].content is empty"),
        ({"messages": CHAT[:2]}, '"messages" has no assistant message: the loss applies only to assistant turns'),
        ({"messages": CHAT[2:4]}, "messages[0] is an assistant message: start with the system or user turn it answers"),
        ({"messages": [CHAT[1], {"role": "assistant", "content": "\n\nParis."}]},
         "messages[1].content starts with whitespace, which tokenizes together with the chat template's turn "
         "header: strip it"),
        ('{"text": ' + "9" * 5000 + "}", "not valid JSON (a number longer than 4300 digits)"),
        ('{"text": "caf\\u00e9 \\ud83d!"}', "not valid Unicode: an unpaired surrogate (\\ud83d at column 21)"),
        ('{"prompt": "a\\udc00", "completion": "b"}', "not valid Unicode: an unpaired surrogate (\\udc00 at column 14)"),
    ],
)
def test_invalid_line_reasons(smollm2_tokenizer, line, reason):
    assert refusal(jsonl(line), smollm2_tokenizer) == f"training data has 1 invalid line: line 1: {reason}"


def test_an_escaped_surrogate_pair_is_one_character(smollm2_tokenizer):
    example = only('{"text": "smile \\ud83d\\ude00 please"}', smollm2_tokenizer)
    assert smollm2_tokenizer.decode(example.input_ids[:-1]) == "smile \U0001f600 please"


def test_invalid_utf8_is_refused_with_its_byte(smollm2_tokenizer):
    data = b'{"text": "fine text"}\n{"text": "caf\xe9"}\n'
    assert refusal(data, smollm2_tokenizer) == (
        "training data has 1 invalid line: line 2: not valid UTF-8 (byte 0xe9 at column 14)"
    )


def test_listed_lines_are_capped_and_the_rest_counted(smollm2_tokenizer):
    data = jsonl(*["[]"] * 50)
    assert refusal(data, smollm2_tokenizer, max_errors=3) == (
        "training data has 50 invalid lines: line 1: not a JSON object, got array; "
        "line 2: not a JSON object, got array; line 3: not a JSON object, got array; ... and 47 more"
    )


def test_the_message_fits_in_grpc_trailers_and_echoes_only_excerpts(smollm2_tokenizer):
    secret = "confidential-" * 100
    data = jsonl(*[{"messages": [{"role": secret, "content": "x"}], secret: 1}] * 40)
    message = refusal(data, smollm2_tokenizer)
    assert len(message) < 1000
    assert message.startswith("training data has 40 invalid lines: line 1: ")
    assert message.endswith(" more")
    assert "confidential-confidential-" not in message


def test_too_long_sequences_are_refused_not_truncated(smollm2_tokenizer):
    line = jsonl({"prompt": "Count: ", "completion": "one two three"})
    length = only(line, smollm2_tokenizer).num_tokens
    assert only(line, smollm2_tokenizer, max_seq_length=length).num_tokens == length
    assert refusal(line, smollm2_tokenizer, max_seq_length=length - 1) == (
        f"training data has 1 invalid line: line 1: has {length} tokens, more than max_seq_length {length - 1} "
        "(raise max_seq_length or shorten it)"
    )


def test_a_chat_line_is_labelled_at_max_seq_length_and_refused_past_it(smollm2_tokenizer):
    line = jsonl({"messages": CHAT})
    length = len(render(smollm2_tokenizer, CHAT, add_generation_prompt=False))
    example = only(line, smollm2_tokenizer, max_seq_length=length)
    assert list(example.input_ids) == render(smollm2_tokenizer, CHAT, add_generation_prompt=False)
    assert labelled_spans(smollm2_tokenizer, example) == ["Paris.<|im_end|>", "Lima.<|im_end|>"]
    assert refusal(line, smollm2_tokenizer, max_seq_length=length - 1) == (
        f"training data has 1 invalid line: line 1: has {length} tokens, more than max_seq_length {length - 1} "
        "(raise max_seq_length or shorten it)"
    )


def test_a_chat_line_over_max_seq_length_is_refused_before_its_turns_are_rendered(smollm2_tokenizer, monkeypatch):
    """Each assistant turn is located by rendering the turns up to it, which costs the square of
    the conversation's length: a line of 20,000 one-word messages (0.8 MB) took half an hour and GBs to
    be refused for its length. Rendered once whole, it is refused at once."""
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}] * 10_000
    length = len(render(smollm2_tokenizer, messages, add_generation_prompt=False))
    apply_chat_template, renders = smollm2_tokenizer.apply_chat_template, []

    def render_once(*args, **kwargs):
        renders.append(args)
        assert len(renders) == 1, "the conversation was rendered turn by turn"
        return apply_chat_template(*args, **kwargs)

    monkeypatch.setattr(smollm2_tokenizer, "apply_chat_template", render_once)
    assert refusal(jsonl({"messages": messages}), smollm2_tokenizer, max_seq_length=4096) == (
        f"training data has 1 invalid line: line 1: has {length} tokens, more than max_seq_length 4096 "
        "(raise max_seq_length or shorten it)"
    )


def test_invalid_lines_past_those_listed_are_only_counted(smollm2_tokenizer):
    """A file of a million bad lines held a reason for each (and each line as an object of its
    own) to list 20: past those listed, a bad line costs no memory of its own."""
    data = jsonl({"text": " ".join(["word"] * 40)}, *["[]"] * 100_000).encode()
    tracing = tracemalloc.is_tracing()
    tracemalloc.start()
    start = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    try:
        # Line 1's reason comes last (its length is checked after every line is read) and is listed first.
        message = refusal(data, smollm2_tokenizer, max_seq_length=32, max_errors=2)
        peak = tracemalloc.get_traced_memory()[1] - start
    finally:
        if not tracing:
            tracemalloc.stop()
    assert message == (
        "training data has 100001 invalid lines: "
        "line 1: has 41 tokens, more than max_seq_length 32 (raise max_seq_length or shorten it); "
        "line 2: not a JSON object, got array; ... and 99999 more"
    )
    assert peak < len(data) / 2


def test_a_parsed_dataset_is_held_in_a_few_bytes_a_token(smollm2_tokenizer):
    """Every queued job holds its parsed dataset: as tuples of Python ints it took 48 bytes a
    token (a 256 MB file, ~2.5 GB a job), and tokenizing the whole file at once peaked higher."""
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    rows = [{"prompt": " ".join(words[i % 7 :] * 4), "completion": " ".join(words[: 3 + i % 5] * 4)} for i in range(1500)]
    rows += [{"text": " ".join(words[i % 5 :] * 12)} for i in range(1500)]
    data = jsonl(*rows).encode()
    tracing = tracemalloc.is_tracing()
    tracemalloc.start()
    start = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    try:
        examples = parse_dataset(data, smollm2_tokenizer, 512)
        held, peak = (m - start for m in tracemalloc.get_traced_memory())
    finally:
        if not tracing:
            tracemalloc.stop()
    tokens = sum(e.num_tokens for e in examples)
    assert len(examples) == 3000 and tokens > 200_000
    assert held / tokens < 16, f"{held / tokens:.1f} bytes a token held"
    assert peak < 8 * len(data), f"peak {peak} bytes for a {len(data)}-byte file"


@pytest.mark.parametrize("data", ["", "\n  \n", b"\xef\xbb\xbf\n"])
def test_an_empty_dataset_is_refused(smollm2_tokenizer, data):
    assert refusal(data, smollm2_tokenizer) == "training data has no examples: give one JSON object per line"


def test_a_template_that_rewrites_earlier_turns_is_refused(smollm2_tokenizer, monkeypatch):
    # Like reasoning models' templates, which drop the thinking of every assistant turn but the last.
    template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{% if m.role == 'assistant' and not loop.last %}(earlier answer){% else %}{{ m.content }}{% endif %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    monkeypatch.setattr(smollm2_tokenizer, "chat_template", template)
    assert refusal(jsonl({"messages": CHAT}), smollm2_tokenizer) == (
        "training data has 1 invalid line: line 1: cannot locate the assistant turn messages[2]: the chat template "
        "does not render the turns before it as a prefix of the whole conversation"
    )


def test_a_template_error_is_reported_for_its_line(smollm2_tokenizer, monkeypatch):
    template = "{% if messages[0].role == 'system' %}{{ raise_exception('no system role') }}{% endif %}x"
    monkeypatch.setattr(smollm2_tokenizer, "chat_template", template)
    assert refusal(jsonl({"messages": CHAT}), smollm2_tokenizer) == (
        'training data has 1 invalid line: line 1: the chat template refused it ("no system role")'
    )


def test_chat_lines_need_a_chat_template(smollm2_tokenizer, monkeypatch):
    monkeypatch.setattr(smollm2_tokenizer, "chat_template", None)
    data = jsonl({"prompt": "a", "completion": "b"}, {"messages": CHAT})
    assert refusal(data, smollm2_tokenizer) == (
        'training data has 1 invalid line: line 2: "messages" needs a chat template and this model has none'
    )


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    (tmp_path / "data" / "sub").mkdir(parents=True)
    (tmp_path / "data" / "sub" / "train.jsonl").write_text("{}\n")
    (tmp_path / "secret.jsonl").write_text("{}\n")
    os.symlink(tmp_path / "secret.jsonl", tmp_path / "data" / "out.jsonl")
    os.symlink(tmp_path / "data" / "sub" / "train.jsonl", tmp_path / "data" / "in.jsonl")
    return tmp_path / "data"


def test_training_files_resolve_inside_the_data_directory(data_dir):
    train = (data_dir / "sub" / "train.jsonl").resolve()
    assert resolve_training_file(data_dir, "sub/train.jsonl") == train
    assert resolve_training_file(str(data_dir), "in.jsonl") == train


@pytest.mark.parametrize("name", ["../secret.jsonl", "sub/../../secret.jsonl", "out.jsonl", "ABSOLUTE"])
def test_training_files_outside_the_data_directory_are_refused(data_dir, name):
    if name == "ABSOLUTE":
        name = str(data_dir / "sub" / "train.jsonl")
    with pytest.raises(InvalidRequest) as info:
        resolve_training_file(data_dir, name)
    assert str(info.value) == f'training_file "{name}" is outside the data directory: name a file relative to it'


@pytest.mark.parametrize("name", ["missing.jsonl", "sub"])
def test_a_missing_training_file_is_not_found(data_dir, name):
    with pytest.raises(NotFound) as info:
        resolve_training_file(data_dir, name)
    assert str(info.value) == f'training_file "{name}" not found: no such file in the data directory'


def test_training_files_need_a_data_directory():
    with pytest.raises(InvalidRequest, match="the server was started without --data-dir"):
        resolve_training_file(None, "train.jsonl")


def numbered(n: int) -> list[TrainingExample]:
    return [TrainingExample((i, i + 1), (IGNORE_INDEX, i + 1)) for i in range(n)]


def test_split_eval_is_a_seeded_partition_in_file_order():
    examples = numbered(100)
    train, held_out = split_eval(examples, 0.1, seed=7)
    assert len(held_out) == 10 and len(train) == 90
    assert sorted(train + held_out, key=examples.index) == examples
    assert train == sorted(train, key=examples.index) and held_out == sorted(held_out, key=examples.index)
    assert split_eval(examples, 0.1, seed=7) == (train, held_out)
    assert split_eval(examples, 0.1, seed=8)[1] != held_out


def test_split_eval_edge_cases():
    assert split_eval(numbered(5), 0.0, seed=0) == (numbered(5), [])
    train, held_out = split_eval(numbered(3), 0.01, seed=0)
    assert (len(train), len(held_out)) == (2, 1)
    with pytest.raises(InvalidRequest, match="eval_fraction 0.5 of 1 examples leaves no training examples"):
        split_eval(numbered(1), 0.5, seed=0)
    for fraction in (1.0, -0.1, float("nan")):
        with pytest.raises(InvalidRequest, match="eval_fraction must be at least 0 and less than 1"):
            split_eval(numbered(10), fraction, seed=0)


def test_position_zero_is_never_a_target():
    assert TrainingExample((5, 6, 7), (5, 6, 7)).num_target_tokens == 2


def sentencepiece_like():
    """A tokenizer that marks words as Llama 2's and Mistral's do: a leading "▁" prepended to
    the text, spaces as "▁"."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "<s>", "</s>", "▁", "▁The", "▁capital", "▁is", "▁Paris", "P", "a", "r", "i", "s"]
    tokenizer = Tokenizer(models.Unigram([(p, -1.0 if len(p) > 1 else -5.0) for p in pieces], unk_id=0))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_a_completion_is_labelled_as_the_whole_text_tokenizes_it(smollm2_tokenizer):
    """Tokenized alone, " Paris" took a word marker of its own on a SentencePiece tokenizer
    (["▁", "▁Paris"]): the model learned to answer with a double space."""
    tok = sentencepiece_like()
    example = only(jsonl({"prompt": "The capital is", "completion": " Paris"}), tok)
    assert tok.convert_ids_to_tokens(list(example.input_ids)) == ["▁The", "▁capital", "▁is", "▁Paris", "</s>"]
    assert labelled_spans(tok, example) == [tok.decode(tok.convert_tokens_to_ids(["▁Paris", "</s>"]))]
    # Byte-level BPE, a prompt ending in a space: the completion as it follows that prompt served.
    example = only(jsonl({"prompt": "Say hi: ", "completion": "Hello there"}), smollm2_tokenizer)
    assert tuple(example.input_ids[-3:-1]) == tuple(smollm2_tokenizer("Hello there", add_special_tokens=False).input_ids)
