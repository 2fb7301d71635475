"""The inference engine: scheduler, KV cache, model runner, sampler, detokenizer."""
