"""Rollout: the Policy protocol, the multi-turn runner and the generation backends (hf, vllm, openai)."""
