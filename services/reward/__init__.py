"""reward-scoring: batched scalar rewards of (prompt, response) pairs from the reward model."""
