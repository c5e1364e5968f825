"""Rollout backends: prompts in, sampled completions out (``base`` defines the record and the interface;
``hf`` samples on the training model, ``vllm`` on a vLLM engine)."""
