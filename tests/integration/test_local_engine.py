"""The offline local engine on its own: accuracy, verified weights, no hub, timestamps, silence.

The model is loaded once for the module (it takes seconds); each fixture is transcribed once and the
results are shared by the accuracy and timestamp tests.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from core.errors import ConfigError
from core.providers.base import ErrorKind, ProviderError, TranscriptionRequest, TranscriptionResult
from core.settings import Settings
from tests.audio_fixtures import wav_bytes
from tests.speech import SpeechFixture, load_fixtures, normalise, word_error_rate
from tests.support import REPO_ROOT
from worker.local_engine import (
    BUNDLED_MODEL_SHA256,
    BUNDLED_PART_SIZES,
    BUNDLED_SIDE_FILES,
    BundledSource,
    LocalProvider,
    bundled_source,
    decode_audio,
    get_local_provider,
    prepare_bundled_model,
    provider_of_process,
    resolve_model,
)

# The repository's shared cache: joined once, reused by every test session and by `make demo`.
CACHE_DIR = REPO_ROOT / ".voxq" / "models"
MAX_WER = 0.15


def _request(audio: bytes, filename: str = "clip.flac", language: str | None = None) -> TranscriptionRequest:
    return TranscriptionRequest(
        audio=audio,
        filename=filename,
        content_type="audio/flac" if filename.endswith(".flac") else "audio/wav",
        model="local",
        audio_seconds=0.0,
        language=language,
    )


@pytest.fixture(scope="module")
def provider() -> LocalProvider:
    """One loaded LocalProvider for the module, on the bundled, verified weights."""
    engine = LocalProvider(Settings(local_model_cache_dir=str(CACHE_DIR), local_concurrency=1))
    engine.load()
    return engine


@pytest.fixture(scope="module")
def fixture_results(provider: LocalProvider) -> list[tuple[SpeechFixture, TranscriptionResult]]:
    """Every committed speech fixture transcribed once (language auto-detected)."""
    fixtures = load_fixtures()
    assert len(fixtures) >= 8
    return [(f, provider.transcribe_sync(_request(f.path.read_bytes(), f.path.name))) for f in fixtures]


def test_fixtures_transcribed_within_wer(
    provider: LocalProvider, fixture_results: list[tuple[SpeechFixture, TranscriptionResult]]
) -> None:
    references = [f.text for f, _ in fixture_results]
    hypotheses = [r.text for _, r in fixture_results]
    wer = word_error_rate(references, hypotheses)
    report = "\n".join(
        f"{normalise(r)!r}\n  vs {normalise(h)!r}" for r, h in zip(references, hypotheses, strict=True)
    )
    assert wer <= MAX_WER, f"WER {wer:.1%} > {MAX_WER:.0%}:\n{report}"
    for fixture, result in fixture_results:
        assert result.model == "local:whisper-base" == provider.name
        assert result.language == "en", fixture.path.name
        assert result.usage is None
        assert result.compute_seconds is not None and result.compute_seconds > 0
        assert result.extra["audio_seconds"] == pytest.approx(fixture.seconds, abs=0.05)


def test_segment_and_word_timestamps_are_monotonic_and_on_the_speech(
    fixture_results: list[tuple[SpeechFixture, TranscriptionResult]],
) -> None:
    for fixture, result in fixture_results:
        name = fixture.path.name
        assert result.segments, name
        assert " ".join(s["text"] for s in result.segments) == result.text
        previous_end = 0.0
        words = []
        for seg in result.segments:
            assert set(seg) == {"start", "end", "text", "words"}
            assert previous_end <= seg["start"] <= seg["end"] <= fixture.seconds + 0.05, (name, seg)
            previous_end = seg["end"]
            assert seg["words"], (name, seg["text"])
            for word in seg["words"]:
                assert set(word) == {"start", "end", "word", "probability"}
                assert seg["start"] <= word["start"] <= word["end"] <= seg["end"], (name, word)
                assert 0.0 <= word["probability"] <= 1.0
                assert word["word"] == word["word"].strip() != ""
            words.extend(seg["words"])
        assert all(a["end"] <= b["start"] for a, b in itertools.pairwise(words)), name
        # Times refer to the given audio: padded silence shows up as an offset, not as words.
        assert words[0]["start"] >= fixture.leading_silence_s - 0.5, (name, words[0])
        assert words[-1]["end"] <= fixture.seconds - fixture.trailing_silence_s + 0.5, (name, words[-1])


@pytest.mark.parametrize("noise", [0.0, 0.003], ids=["digital-silence", "quiet-noise"])
def test_silence_gives_empty_text(provider: LocalProvider, noise: float) -> None:
    rng = np.random.default_rng(7)
    samples = rng.normal(0.0, noise, 16_000 * 12) if noise else np.zeros(16_000 * 12)
    result = provider.transcribe_sync(_request(wav_bytes(samples), "silence.wav"))
    assert result.text == ""
    assert result.segments == []
    assert result.extra["audio_seconds"] == pytest.approx(12.0, abs=0.01)


def test_undecodable_audio_is_an_invalid_audio_provider_error(provider: LocalProvider) -> None:
    with pytest.raises(ProviderError) as info:
        provider.transcribe_sync(_request(b"not audio at all" * 100, "junk.flac"))
    assert info.value.kind is ErrorKind.INVALID_AUDIO
    assert info.value.code == "invalid_audio"


def test_async_transcribe_and_given_language(provider: LocalProvider) -> None:
    fixture = load_fixtures()[0]
    result = asyncio.run(provider.transcribe(_request(fixture.path.read_bytes(), language="en")))
    assert result.language == "en"
    assert word_error_rate([fixture.text], [result.text]) <= 0.25


def test_process_singleton_is_lazy_and_shared(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOXQ_LOCAL_MODEL_CACHE_DIR", str(CACHE_DIR))
    monkeypatch.setenv("VOXQ_LOCAL_CONCURRENCY", "2")
    monkeypatch.setenv("VOXQ_LOCAL_CPU_THREADS", "0")
    from core.settings import reset_settings_cache

    reset_settings_cache()
    provider_of_process.cache_clear()  # a provider built under other settings is not this test's
    try:
        first = get_local_provider()
        assert first is get_local_provider()
        assert not first.loaded  # nothing is loaded until the first transcription or load()
        assert first.name == "local:whisper-base"
        assert first.concurrency == 2
        assert first.cpu_threads == max(1, len(os.sched_getaffinity(0)) // 2)
    finally:
        provider_of_process.cache_clear()
        reset_settings_cache()


# --- verified weights -------------------------------------------------------------------------------


def _fake_source(
    tmp_path: Path, sizes: tuple[int, ...], side_override: dict[str, bytes] | None = None
) -> BundledSource:
    """Parts of the given sizes full of zeros (sparse: cheap) next to copies of the real side files."""
    real = bundled_source()
    tmp_path.mkdir()
    parts = []
    for index, size in enumerate(sizes, start=1):
        part = tmp_path / f"model.bin.part{index}"
        with part.open("wb") as handle:
            handle.truncate(size)
        parts.append(part)
    side = {}
    for name, path in real.side_files.items():
        copy = tmp_path / name
        copy.write_bytes((side_override or {}).get(name, path.read_bytes()))
        side[name] = copy
    return BundledSource(parts=tuple(parts), side_files=side)


def test_sha256_mismatch_is_a_clear_config_error(tmp_path: Path) -> None:
    source = _fake_source(tmp_path / "src", BUNDLED_PART_SIZES)
    cache = tmp_path / "cache"
    with pytest.raises(ConfigError) as info:
        prepare_bundled_model(cache, source=source)
    message = info.value.message
    assert "SHA-256" in message and BUNDLED_MODEL_SHA256 in message and "refusing to load" in message
    assert info.value.code == "config_error"
    # Nothing unverified is left behind for a later load to pick up.
    model_dir = cache / f"whisper-base-{BUNDLED_MODEL_SHA256[:12]}"
    assert not (model_dir / "model.bin").exists()
    assert not [p for p in model_dir.iterdir() if p.name.endswith(".tmp")]


def test_wrong_part_size_is_a_config_error(tmp_path: Path) -> None:
    source = _fake_source(tmp_path / "src", (BUNDLED_PART_SIZES[0], BUNDLED_PART_SIZES[1] - 1))
    with pytest.raises(ConfigError, match=r"model\.bin\.part2 has 72608765 bytes, expected 72608766"):
        prepare_bundled_model(tmp_path / "cache", source=source)


def test_tampered_tokenizer_is_a_config_error(tmp_path: Path) -> None:
    source = _fake_source(tmp_path / "src", BUNDLED_PART_SIZES, {"tokenizer.json": b"{}"})
    with pytest.raises(
        ConfigError, match=r"tokenizer\.json has SHA-256 .* expected " + BUNDLED_SIDE_FILES["tokenizer.json"]
    ):
        prepare_bundled_model(tmp_path / "cache", source=source)


def test_damaged_cache_is_rejoined_and_verified(tmp_path: Path) -> None:
    model_dir = prepare_bundled_model(tmp_path)
    model_bin = model_dir / "model.bin"
    with model_bin.open("r+b") as handle:
        handle.seek(1_000_000)
        byte = handle.read(1)
        handle.seek(1_000_000)
        handle.write(bytes([byte[0] ^ 0xFF]))
    assert prepare_bundled_model(tmp_path) == model_dir
    assert hashlib.sha256(model_bin.read_bytes()).hexdigest() == BUNDLED_MODEL_SHA256


def test_racing_processes_join_one_verified_file(tmp_path: Path) -> None:
    script = "import sys; from pathlib import Path; from worker.local_engine import prepare_bundled_model; "
    script += "print(prepare_bundled_model(Path(sys.argv[1])))"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], env=env, stdout=subprocess.PIPE)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120)[0].decode().strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outputs[0] == outputs[1]
    model_dir = Path(outputs[0])
    assert sorted(p.name for p in model_dir.iterdir()) == [
        ".lock",
        "config.json",
        "model.bin",
        "tokenizer.json",
        "vocabulary.txt",
    ]
    assert (model_dir / "model.bin").stat().st_size == sum(BUNDLED_PART_SIZES)


# --- model directory and hub ------------------------------------------------------------------------


def test_custom_model_dir_is_used_and_named(provider: LocalProvider, tmp_path: Path) -> None:
    assert provider.model_path is not None
    custom = tmp_path / "my-whisper"
    custom.mkdir()
    for item in provider.model_path.iterdir():
        if not item.name.startswith("."):
            (custom / item.name).symlink_to(item)
    spec = resolve_model(Settings(local_model_dir=str(custom)))
    assert spec.name == "local:my-whisper" and spec.path == custom
    assert LocalProvider(Settings(local_model_dir=str(custom))).name == "local:my-whisper"

    (custom / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match=r"no tokenizer\.json"):
        resolve_model(Settings(local_model_dir=str(custom)))
    with pytest.raises(ConfigError, match=r"missing: model\.bin, config\.json"):
        resolve_model(Settings(local_model_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match="not a CTranslate2 Whisper model directory"):
        LocalProvider(Settings(local_model_dir=str(tmp_path / "nope"))).load()


OFFLINE_SCRIPT = textwrap.dedent(
    """
    import json, os, socket, sys
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(repr(args[:2]))
        raise OSError("network is blocked in this test")

    socket.create_connection = refuse
    socket.getaddrinfo = refuse
    socket.socket.connect = lambda self, *a, **k: refuse(*a)
    socket.socket.connect_ex = lambda self, *a, **k: refuse(*a)

    from worker.local_engine import get_local_provider
    from core.providers.base import TranscriptionRequest

    provider = get_local_provider()
    provider.load()
    audio = open(sys.argv[1], "rb").read()
    result = provider.transcribe_sync(
        TranscriptionRequest(audio=audio, filename="a.flac", content_type="audio/flac", model="local",
                             audio_seconds=0.0)
    )
    print(json.dumps({"attempts": attempts, "text": result.text, "model": result.model,
                      "hf_hub_offline": os.environ.get("HF_HUB_OFFLINE")}))
    """
)


def test_loads_and_transcribes_with_the_network_blocked(tmp_path: Path) -> None:
    fixture = load_fixtures()[0]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "VOXQ_"))}
    env.update(
        PYTHONPATH=str(REPO_ROOT),
        VOXQ_LOCAL_MODEL_CACHE_DIR=str(CACHE_DIR),
        HF_HOME=str(tmp_path / "hf"),  # an empty hub cache: a hub lookup could not be served from disk
    )
    proc = subprocess.run(
        [sys.executable, "-c", OFFLINE_SCRIPT, str(fixture.path)],
        env=env,
        capture_output=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    out = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    assert out["attempts"] == []
    assert out["model"] == "local:whisper-base"
    assert out["hf_hub_offline"] == "1"
    assert word_error_rate([fixture.text], [out["text"]]) <= 0.25
    assert not (tmp_path / "hf").exists()


CPU_SCRIPT = textwrap.dedent(
    """
    import sys, threading, time
    from worker.local_engine import get_local_provider
    from core.providers.base import TranscriptionRequest

    provider = get_local_provider()
    if sys.argv[2] == "short-lived-thread":
        loader = threading.Thread(target=provider.load)  # as a worker's background loader does
        loader.start()
        loader.join()
    else:
        provider.load()
    audio = open(sys.argv[1], "rb").read()
    request = TranscriptionRequest(audio=audio, filename="a.flac", content_type="audio/flac", model="local",
                                   audio_seconds=0.0)
    costs = []
    for _ in range(2):
        before = time.process_time()
        provider.transcribe_sync(request)
        costs.append(time.process_time() - before)
    print(min(costs))
    """
)


def test_loading_on_a_thread_that_exits_costs_no_extra_cpu_per_transcription() -> None:
    # A CTranslate2 model built on a thread that then exits burns ~3-5x the CPU per transcription
    # (measured); the provider builds it on a thread of its own so the caller's thread does not matter.
    fixture = load_fixtures()[0]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "VOXQ_LOCAL_MODEL_CACHE_DIR": str(CACHE_DIR)}
    cpu = {}
    for mode in ("main-thread", "short-lived-thread"):
        proc = subprocess.run(
            [sys.executable, "-c", CPU_SCRIPT, str(fixture.path), mode],
            env=env,
            capture_output=True,
            timeout=300,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr.decode()[-3000:]
        cpu[mode] = float(proc.stdout.decode().strip().splitlines()[-1])
    assert cpu["short-lived-thread"] < 1.5 * cpu["main-thread"], cpu


def test_any_rate_and_channel_layout_is_downmixed_and_resampled(provider: LocalProvider) -> None:
    fixture = next(f for f in load_fixtures() if f.path.name == "vm06_insurance.flac")
    mono16k = decode_audio(fixture.path.read_bytes())
    # 44.1 kHz stereo WAV of the same speech (linear resampling is enough for this purpose).
    t_out = np.arange(int(len(mono16k) * 44_100 / 16_000)) / 44_100
    upsampled = np.interp(t_out, np.arange(len(mono16k)) / 16_000, mono16k)
    stereo = np.stack([upsampled, upsampled * 0.5], axis=1)
    result = provider.transcribe_sync(_request(wav_bytes(stereo, rate=44_100), "stereo.wav"))
    assert result.extra["audio_seconds"] == pytest.approx(fixture.seconds, abs=0.05)
    assert word_error_rate([fixture.text], [result.text]) <= MAX_WER, result.text


def test_concurrent_transcriptions_share_one_model() -> None:
    fixtures = load_fixtures()[:3]
    engine = LocalProvider(Settings(local_model_cache_dir=str(CACHE_DIR), local_concurrency=2))

    async def all_at_once() -> list[TranscriptionResult]:
        return await asyncio.gather(*(engine.transcribe(_request(f.path.read_bytes())) for f in fixtures))

    results = asyncio.run(all_at_once())
    assert engine.concurrency == 2 and engine.loaded
    wer = word_error_rate([f.text for f in fixtures], [r.text for r in results])
    assert wer <= MAX_WER, [r.text for r in results]
