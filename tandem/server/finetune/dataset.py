"""Training data for fine-tuning jobs: JSONL lines into token ids and loss masks.

A job's dataset is validated in full before the job is queued, so a bad line fails the request
that submitted it, with its line number and what to change, rather than a job hours later.
Each line is one of three formats, and a file may mix them:

- {"prompt": str, "completion": str}: the loss applies to the completion and the eos after it;
- {"messages": [{"role": ..., "content": ...}, ...]}: rendered with the chat template as the
  server renders chat requests; the loss applies to each assistant turn (its content and the
  end-of-turn token closing it), never to a turn header or another role's turn;
- {"text": str}: the loss applies to every token and an eos after the text (as TRL's
  SFTTrainer adds one): a model trained on documents learns where one ends.

Any line may also carry "task": str, a label for training a router's gates (the expert that
task calls for; server/finetune/trainable_gates.py); other jobs ignore it.

Sequences longer than max_seq_length are refused, never truncated: a truncated example
trains on something the user did not write.
"""

import difflib
import itertools
import json
import random
import re
import sys
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

from tandem.server.engine.chat import CHAT_ROLES, TemplateRefused, render_chat
from tandem.server.engine.iteration import IGNORE_INDEX
from tandem.server.errors import InvalidRequest, NotFound

# The keys of each line format; a line has exactly one format's keys.
FORMATS = {"prompt/completion": ("prompt", "completion"), "messages": ("messages",), "text": ("text",)}
# Characters of text tokenized at once (about 64k tokens): the tokenizer's lists are Python
# ints, ~40 bytes a token.
ENCODE_CHARS = 1 << 18
# The optional task label a line of any format may carry.
TASK_KEY = "task"
# The refusal travels in gRPC trailers, which proxies cap at a few KB.
MAX_ERROR_CHARS = 1000
# Enough of a user's string to recognise it, not enough to copy their data into logs.
EXCERPT_CHARS = 24
# A JSON escape of half a surrogate pair without its other half.
_UNPAIRED = re.compile(
    r"(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}"
    r"|\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})"
)


@dataclass(frozen=True, slots=True)
class TrainingExample:
    """One training sequence. input_ids: [n] token ids; labels: [n], labels[i] = input_ids[i] where the
    loss applies to token i (predicted from tokens < i), IGNORE_INDEX elsewhere (the Hugging Face convention:
    the model shifts internally).

    Both are kept as int32 arrays: every queued job holds its whole dataset, and tuples of ints
    took 48 bytes a token (a 256 MB file: ~2.5 GB per job) where the arrays take 8."""

    input_ids: Sequence[int]
    labels: Sequence[int]
    task: str = ""

    def __post_init__(self):
        object.__setattr__(self, "input_ids", _int32(self.input_ids))
        object.__setattr__(self, "labels", _int32(self.labels))
        if len(self.input_ids) != len(self.labels):
            raise ValueError(f"input_ids has {len(self.input_ids)} tokens but labels has {len(self.labels)}")

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_target_tokens(self) -> int:
        """Tokens the loss applies to; position 0 has no tokens before it to be predicted from."""
        return sum(label != IGNORE_INDEX for label in self.labels[1:])


def _int32(values: Sequence[int]) -> array:
    return values if isinstance(values, array) and values.typecode == "i" else array("i", values)


class _LineError(Exception):
    """Why one line is refused; collected so that every bad line is reported at once."""


class _Errors:
    """The reasons of the first `keep` invalid lines (by line number) and how many there are: a
    file of a million bad lines held a message for each, to report 20."""

    def __init__(self, keep: int):
        self.keep = keep
        self.count = 0
        self.first: dict[int, str] = {}

    def __setitem__(self, number: int, reason: str) -> None:
        self.count += 1
        self.first[number] = reason
        if len(self.first) > 2 * self.keep:  # lines come out of order (by format): trim now and then
            self.first = dict(sorted(self.first.items())[: self.keep])


def parse_dataset(
    data: str | bytes, tokenizer, max_seq_length: int, *, check: Callable[[TrainingExample], str | None] | None = None,
    max_errors: int = 20,
) -> list[TrainingExample]:
    """Every non-blank line of a JSONL dataset as a training example, in file order.

    check: the job's own rule for an example (what the server can hold, which task labels its
    router knows): the reason it is refused, or None. Raises InvalidRequest naming every
    invalid line (line number and reason; the first max_errors of them) if any line is
    invalid, or if there are no examples at all.
    """
    errors = _Errors(max_errors)
    examples: dict[int, TrainingExample] = {}
    encoders = {
        "prompt/completion": _encode_prompts,
        "messages": partial(_encode_chats, max_seq_length=max_seq_length),
        "text": _encode_texts,
    }
    for name, records in _read_records(data, errors).items():
        results = (encoders[name](chunk, tokenizer) for chunk in _chunks(records, ENCODE_CHARS))
        for number, result in itertools.chain.from_iterable(r.items() for r in results):
            if isinstance(result, str):
                errors[number] = result
            else:
                examples[number] = replace(result, task=records[number].get(TASK_KEY, ""))
    for number, example in examples.items():
        if example.num_tokens > max_seq_length:
            errors[number] = _too_long(example.num_tokens, max_seq_length)
        elif example.num_target_tokens == 0:
            errors[number] = "has no tokens to train on (its text tokenizes to nothing)"
        elif check is not None and (reason := check(example)) is not None:
            errors[number] = reason
    if errors.count:
        raise InvalidRequest(_summarize(errors))
    if not examples:
        raise InvalidRequest("training data has no examples: give one JSON object per line")
    return [examples[number] for number in sorted(examples)]


def _chunks(records: dict[int, dict], chars: int) -> Iterator[dict[int, dict]]:
    """The records in runs of about `chars` characters of text: the tokenizer hands back Python
    ints, ~40 bytes a token, and a whole file's at once peaked at several times the file."""
    chunk: dict[int, dict] = {}
    size = 0
    for number, record in records.items():
        chunk[number] = record
        size += sum(len(value) for value in record.values() if isinstance(value, str))
        if size >= chars:
            yield chunk
            chunk, size = {}, 0
    if chunk:
        yield chunk


def resolve_training_file(data_dir: str | Path | None, name: str) -> Path:
    """The file `name` (relative to data_dir) names, resolved.

    Refuses names that leave data_dir (absolute paths, '..', symlinks pointing out), so a job
    request cannot make the server read arbitrary files.
    """
    if data_dir is None:
        raise InvalidRequest("training_file cannot be read: the server was started without --data-dir")
    if not name:
        raise InvalidRequest("training_file is empty: name a file in the data directory")
    shown = _excerpt(name, 100)
    root = Path(data_dir).resolve()
    try:
        path = (root / name).resolve()
        if Path(name).is_absolute() or not path.is_relative_to(root):
            raise InvalidRequest(f"training_file {shown} is outside the data directory: name a file relative to it")
        if not path.is_file():
            raise NotFound(f"training_file {shown} not found: no such file in the data directory")
    except (OSError, ValueError):  # a NUL byte, a name too long for the file system
        raise InvalidRequest(f"training_file {shown} is not a valid path") from None
    return path


def split_eval(
    examples: list[TrainingExample], eval_fraction: float, seed: int
) -> tuple[list[TrainingExample], list[TrainingExample]]:
    """(train, eval): a seeded random eval_fraction of the examples held out, both in file order.

    The same examples, fraction and seed give the same split, so a job's eval loss can be
    reproduced; a fraction above 0 holds out at least one example and leaves at least one.
    """
    if not 0 <= eval_fraction < 1:
        raise InvalidRequest(f"eval_fraction must be at least 0 and less than 1, got {eval_fraction}")
    if eval_fraction == 0:
        return list(examples), []
    num_eval = max(1, round(len(examples) * eval_fraction))
    if num_eval >= len(examples):
        raise InvalidRequest(
            f"eval_fraction {eval_fraction} of {len(examples)} examples leaves no training examples: "
            "add examples or set eval_fraction to 0"
        )
    held_out = set(random.Random(seed).sample(range(len(examples)), num_eval))
    train = [e for i, e in enumerate(examples) if i not in held_out]
    return train, [e for i, e in enumerate(examples) if i in held_out]


def _read_records(data: str | bytes, errors: _Errors) -> dict[str, dict[int, dict]]:
    """Each valid line's JSON object, by format and line number; each invalid line's reason goes
    into errors."""
    by_format: dict[str, dict[int, dict]] = {}
    for number, line in enumerate(_lines(data), start=1):
        try:
            record = _load(line)
            if record is not None:
                by_format.setdefault(_format_of(record), {})[number] = record
        except _LineError as e:
            errors[number] = str(e)
    return by_format


def _lines(data: str | bytes) -> Iterator[str | bytes]:
    """data.split("\n") less a byte order mark, one line at a time: split() held a second copy of
    the whole file, and for short lines several (each line an object of its own)."""
    newline, bom = (b"\n", b"\xef\xbb\xbf") if isinstance(data, bytes) else ("\n", "\ufeff")
    start = len(bom) if data.startswith(bom) else 0
    while (end := data.find(newline, start)) >= 0:
        yield data[start:end]
        start = end + 1
    yield data[start:]


def _load(line: str | bytes) -> object | None:
    """The JSON value on one line; None for a blank line."""
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _LineError(f"not valid UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1})") from None
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise _LineError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise _LineError("not valid JSON (nested too deeply)") from None
    except ValueError:
        raise _LineError(f"not valid JSON (a number longer than {sys.get_int_max_str_digits()} digits)") from None
    _check_unicode(line, record)
    return record


def _check_unicode(line: str, record: object) -> None:
    """JSON may escape half of a surrogate pair (\\ud800), which is no character: the
    tokenizer cannot encode it, and an error message that echoed it could not be sent."""
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        escape = _UNPAIRED.search(line)
        where = f" ({escape.group()} at column {escape.start() + 1})" if escape else ""
        raise _LineError(f"not valid Unicode: an unpaired surrogate{where}") from None


def _format_of(record: object) -> str:
    """The line's format, once its keys and values are checked."""
    if not isinstance(record, dict):
        raise _LineError(f"not a JSON object, got {_json_type(record)}")
    formats = [name for name, keys in FORMATS.items() if any(key in record for key in keys)]
    if not formats:
        all_keys = tuple(key for keys in FORMATS.values() for key in keys)
        got = ", ".join(_describe_key(key, all_keys) for key in list(record)[:3]) or "none"
        raise _LineError(f'unknown format: expected "prompt" and "completion", "messages" or "text" keys, got {got}')
    if len(formats) > 1:
        raise _LineError(f"mixes the {' and '.join(formats)} formats: use one format per line")
    (name,) = formats
    if TASK_KEY in record:
        _check_text(record[TASK_KEY], f'"{TASK_KEY}"')
    _check_keys({k: v for k, v in record.items() if k != TASK_KEY}, FORMATS[name], "")
    if name == "messages":
        _check_messages(record["messages"])
    else:
        for key in FORMATS[name]:
            _check_text(record[key], f'"{key}"')
    return name


def _check_messages(messages: object) -> None:
    if not isinstance(messages, list):
        raise _LineError(f'"messages" must be a list, got {_json_type(messages)}')
    if not messages:
        raise _LineError('"messages" is empty')
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _LineError(f'{where} must be an object with "role" and "content", got {_json_type(message)}')
        _check_keys(message, ("role", "content"), f"{where}: ")
        role = message["role"]
        if role not in CHAT_ROLES:
            got = _excerpt(role) if isinstance(role, str) else _json_type(role)
            raise _LineError(f"{where}.role must be one of {', '.join(CHAT_ROLES)}, got {got}")
        _check_text(message["content"], f"{where}.content")
    if not any(message["role"] == "assistant" for message in messages):
        raise _LineError('"messages" has no assistant message: the loss applies only to assistant turns')
    if messages[0]["role"] == "assistant":
        raise _LineError("messages[0] is an assistant message: start with the system or user turn it answers")


def _check_keys(record: dict, expected: tuple[str, ...], where: str) -> None:
    problems = [f'missing "{key}"' for key in expected if key not in record]
    problems += [f"unknown key {_describe_key(key, expected)}" for key in record if key not in expected][:3]
    if problems:
        raise _LineError(where + ", ".join(problems))


def _check_text(value: object, name: str) -> None:
    if not isinstance(value, str):
        raise _LineError(f"{name} must be a string, got {_json_type(value)}")
    if not value.strip():
        raise _LineError(f"{name} is empty")


def _encode_prompts(records: dict[int, dict], tokenizer) -> dict[int, TrainingExample]:
    """The prompt tokenized as the server tokenizes a prompt, then the completion and eos as
    targets. The completion's tokens are those the whole text has after the prompt's, where
    the prompt's start it: tokenized alone, a SentencePiece tokenizer (Llama 2's, Mistral's)
    gave it a word marker of its own (" Paris" became ["▁", "▁Paris"]), and every example
    taught the model a double space. Where the two do not line up (a prompt ending in a space,
    on a byte-level BPE tokenizer), the completion alone: what follows that prompt served."""
    prompts = tokenizer([r["prompt"] for r in records.values()]).input_ids
    whole = tokenizer([r["prompt"] + r["completion"] for r in records.values()]).input_ids
    alone = tokenizer([r["completion"] for r in records.values()], add_special_tokens=False).input_ids
    eos = [tokenizer.eos_token_id]
    examples = {}
    for number, prompt, text, completion in zip(records, prompts, whole, alone):
        if text[: len(prompt)] == prompt and len(text) > len(prompt):
            completion = text[len(prompt) :]
        examples[number] = TrainingExample(prompt + completion + eos, [IGNORE_INDEX] * len(prompt) + completion + eos)
    return examples


def _encode_texts(records: dict[int, dict], tokenizer) -> dict[int, TrainingExample]:
    texts = tokenizer([r["text"] for r in records.values()]).input_ids
    eos = tokenizer.eos_token_id
    examples = {}
    for number, ids in zip(records, texts):
        ids = ids if ids[-1:] == [eos] else ids + [eos]  # a tokenizer that adds one already: not twice
        examples[number] = TrainingExample(ids, [IGNORE_INDEX, *ids[1:]])
    return examples


def _encode_chats(records: dict[int, dict], tokenizer, max_seq_length: int) -> dict[int, TrainingExample | str]:
    """Conversations rendered whole, each assistant turn located by rendering the turns up to it;
    a reason instead of an example for each line that cannot be labelled."""
    if not getattr(tokenizer, "chat_template", None):
        return {number: '"messages" needs a chat template and this model has none' for number in records}
    results: dict[int, TrainingExample | str] = {}
    for number, record in records.items():
        try:
            results[number] = _encode_chat(record["messages"], tokenizer, max_seq_length)
        except _LineError as e:
            results[number] = str(e)
    return results


def _encode_chat(messages: list[dict], tokenizer, max_seq_length: int) -> TrainingExample:
    """Labels on each assistant turn's tokens, found as the tokens rendering the turns through it
    adds to rendering those before it (ready for the assistant: what the server would prompt with).

    That is only sound if both renderings tokenize to prefixes of the whole conversation's
    tokens: a template that renders earlier turns differently later, or text that merges into
    one token across the turn boundary, would shift the span, so such lines are refused.
    Rendering every turn's prefixes costs the square of the conversation's length (a line of
    20,000 one-word messages: half an hour, and GBs of prefixes), so only a line that fits max_seq_length
    gets that far, and one turn's two renderings are held at a time.
    """
    full = tokenizer(_render(tokenizer, messages, False), add_special_tokens=False).input_ids
    if len(full) > max_seq_length:
        raise _LineError(_too_long(len(full), max_seq_length))
    labels = [IGNORE_INDEX] * len(full)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        texts = [_render(tokenizer, messages[:i], True), _render(tokenizer, messages[: i + 1], False)]
        before, through = tokenizer(texts, add_special_tokens=False).input_ids
        if not (len(before) < len(through) and full[: len(through)] == through and through[: len(before)] == before):
            raise _LineError(_unlocatable(i, message["content"]))
        end = _turn_end(through, len(before), tokenizer)
        labels[len(before) : end] = full[len(before) : end]
    return TrainingExample(full, labels)


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    try:
        return render_chat(tokenizer, messages, add_generation_prompt)
    except TemplateRefused as e:
        raise _LineError(f"the chat template refused it ({_excerpt(e.reason, 80)})") from None


def _turn_end(tokens: list[int], start: int, tokenizer) -> int:
    """The end of a turn's labelled span: the turn less the whitespace a template puts between
    turns (the newline after <|im_end|>), which generation never reaches since it stops at the
    end-of-turn token."""
    end = len(tokens)
    while end > start + 1 and not tokenizer.decode(tokens[end - 1 : end]).strip():
        end -= 1
    return end


def _unlocatable(index: int, content: str) -> str:
    if content[:1].isspace():
        return (
            f"messages[{index}].content starts with whitespace, which tokenizes together with the chat "
            "template's turn header: strip it"
        )
    return (
        f"cannot locate the assistant turn messages[{index}]: the chat template does not render the turns "
        "before it as a prefix of the whole conversation"
    )


def _too_long(num_tokens: int, max_seq_length: int) -> str:
    return f"has {num_tokens} tokens, more than max_seq_length {max_seq_length} (raise max_seq_length or shorten it)"


def _summarize(errors: _Errors) -> str:
    """One message naming the first invalid lines, short enough for gRPC trailers."""
    head = f"training data has {errors.count} invalid line{'s' if errors.count != 1 else ''}: "
    # Room for the longest possible tail, "; ... and <count> more".
    budget = MAX_ERROR_CHARS - len(head) - len(f"; ... and {errors.count} more")
    parts: list[str] = []
    for number, reason in sorted(errors.first.items())[: errors.keep]:
        part = f"line {number}: {reason}"
        if parts and len("; ".join(parts)) + 2 + len(part) > budget:
            break
        parts.append(part)
    rest = errors.count - len(parts)
    return head + "; ".join(parts) + (f"; ... and {rest} more" if rest else "")


def _describe_key(key: str, candidates: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, candidates, n=1)
    return _excerpt(key) + (f' (did you mean "{close[0]}"?)' if close else "")


def _excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    return json.dumps(text[:limit]) + ("..." if len(text) > limit else "")


def _json_type(value: object) -> str:
    for kind, name in ((bool, "boolean"), ((int, float), "number"), (str, "string"), (list, "array"), (dict, "object")):
        if isinstance(value, kind):
            return name
    return "null"
