"""Transcription providers: the hosted OpenAI-compatible API and the offline local engine."""
