"""LLM agents: providers (client), prompts, answer parsing (edits), the patch guard, and the llm-hp, llm-code and
centaur methods. Nothing here is imported unless a method that needs an LLM runs."""
