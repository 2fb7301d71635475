"""A tokenizer for random models on machines without the SmolLM2 file (GPU hosts, benches)."""


def word_tokenizer(vocab_size: int):
    """A tokenizer whose token i is the word t<i>: enough to decode random ids offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t0", eos_token="t1")
