"""Transcription providers' wire format: the contract (base) and the OpenAI-compatible HTTP client."""
