"""What the client sends for a caller's Python values and what it hands back for the
server's: the shapes a caller writes by habit (OpenAI's) and float32 fields read as typed."""

import pytest

from tandem.client.convert import finetune_job, generate_request, merge_request
from tandem.v1 import finetuning_pb2, generation_pb2


@pytest.mark.parametrize("kind", [generation_pb2.GenerateRequest, generation_pb2.GenerateStreamRequest])
def test_a_stop_given_as_a_string_is_one_stop_string(kind):
    """protobuf reads a str as a sequence: stop="\\n\\n" stopped at the first newline, stop="END"
    at the first E, N or D."""
    assert list(generate_request("x", None, None, "", {"stop": "\n\n"}, kind).stop) == ["\n\n"]
    assert list(generate_request("x", None, None, "", {"stop": ["END", "\n"]}, kind).stop) == ["END", "\n"]


def test_an_unknown_merge_method_is_refused_naming_the_methods():
    """It was sent as the unset enum, and the server's answer named proto enum values."""
    with pytest.raises(ValueError, match="unknown merge method 'dare-ties': choose one of breadcrumbs, dare_ties, linear, ties"):
        merge_request("m", ["a", "b"], "dare-ties", 0)


def test_float32_fields_read_as_the_decimals_they_hold():
    """lora_dropout 0.1 showed as 0.10000000149011612 in `tandem finetune get` and --json."""
    job = finetune_job(finetuning_pb2.Job(
        lora=finetuning_pb2.LoraConfig(lora_alpha=0.3, lora_dropout=0.1), train_loss=2.3456, eval_loss=1.1,
        tokens_per_second=123.4, finetune_share=0.7,
    ))
    assert (job.lora["lora_alpha"], job.lora["lora_dropout"]) == (0.3, 0.1)
    assert (job.train_loss, job.eval_loss, job.tokens_per_second, job.finetune_share) == (2.3456, 1.1, 123.4, 0.7)
    assert finetune_job(finetuning_pb2.Job()).train_loss is None
