"""Integrations with other tools, built on the public API: a gpt4free provider and an llm plugin."""
