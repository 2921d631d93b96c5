"""feedback service: durable store of prompts, demonstrations and K-way rankings (SQLite), comparison
tasks sampled from policy-inference, export to the trainer's JSONL formats, and a small labeling page."""
