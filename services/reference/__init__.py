"""reference-model: per-token logprobs of token sequences under the frozen SFT model."""
