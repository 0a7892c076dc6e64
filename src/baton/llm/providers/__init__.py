"""Model providers: OpenAI-compatible HTTP, Anthropic Messages, scripted cassettes."""
