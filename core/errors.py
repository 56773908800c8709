"""voxq's error tree. Each error carries a stable `code` that APIs, job rows and metrics use.

VoxqError
├── ConfigError          Raised when settings are missing or unsafe.
├── StorageError         Raised when S3 refuses or loses an operation.
├── AudioError           Raised when a file is not usable audio (job fails, worker goes on).
│   ├── UnsupportedMedia     not decodable audio / no audio stream
│   ├── EmptyAudio           zero bytes or zero decoded samples
│   ├── AudioTooLong         decoded duration above VOXQ_MAX_AUDIO_SECONDS
│   └── MediaLimitExceeded   reading it needs more memory or CPU time than the media sandbox allows
├── ProviderError        Raised by a transcription provider call; see core.providers for subclasses.
├── BudgetExceeded       Raised when a call would take a batch past its budget.
└── ModelUnavailable     Raised when no model in the chain can be used.
"""

from __future__ import annotations


class VoxqError(Exception):
    """Base of every error voxq raises on purpose."""

    code = "internal_error"

    def __init__(self, message: str = "", *, code: str | None = None) -> None:
        super().__init__(message or self.__class__.__doc__ or self.code)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        """The human-readable message."""
        return str(self)


class ConfigError(VoxqError):
    """Raised when settings are missing or unsafe."""

    code = "config_error"


class StorageError(VoxqError):
    """Raised when S3 refuses or loses an operation."""

    code = "storage_error"


class AudioError(VoxqError):
    """Raised when a file is not usable audio."""

    code = "invalid_audio"


class UnsupportedMedia(AudioError):
    """Raised when a file is not decodable audio (or has no audio stream)."""

    code = "unsupported_media"


class EmptyAudio(AudioError):
    """Raised when a file is empty or decodes to no samples."""

    code = "empty_audio"


class AudioTooLong(AudioError):
    """Raised when decoded audio is longer than VOXQ_MAX_AUDIO_SECONDS."""

    code = "audio_too_long"


class MediaLimitExceeded(AudioError):
    """Raised when reading a file needs more memory or CPU time than the media sandbox allows."""

    code = "media_limit_exceeded"


class BudgetExceeded(VoxqError):
    """Raised when a provider call would take a batch past its budget."""

    code = "budget_exceeded"


class ModelUnavailable(VoxqError):
    """Raised when no model in the chain can be used."""

    code = "no_model_available"
