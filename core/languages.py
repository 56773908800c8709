"""Language names and codes: transcripts carry ISO-639-1 codes, whatever a model answered.

whisper-1 (and servers running Whisper) answer `verbose_json` with the language's English name
("english"), where the API promises ISO-639-1 codes; the local engine (faster-whisper) answers Whisper's
codes. `iso_language` turns either into the code voxq stores and serves. The names are Whisper's own
(its tokenizer's language list, the 100 codes faster-whisper's `WhisperModel.supported_languages` gives
for a multilingual model) plus the aliases Whisper accepts ("castilian", "mandarin", ...).

Where Whisper's code is not ISO-639-1, the ISO code wins: Javanese is `jv` (Whisper says `jw`);
Hawaiian and Cantonese have no two-letter code and keep ISO 639-2/3's `haw` and `yue`.
"""

from __future__ import annotations

# Whisper's language names, lower case, to ISO-639-1 codes.
WHISPER_NAMES: dict[str, str] = {
    "afrikaans": "af",
    "amharic": "am",
    "arabic": "ar",
    "assamese": "as",
    "azerbaijani": "az",
    "bashkir": "ba",
    "belarusian": "be",
    "bulgarian": "bg",
    "bengali": "bn",
    "tibetan": "bo",
    "breton": "br",
    "bosnian": "bs",
    "catalan": "ca",
    "czech": "cs",
    "welsh": "cy",
    "danish": "da",
    "german": "de",
    "greek": "el",
    "english": "en",
    "spanish": "es",
    "estonian": "et",
    "basque": "eu",
    "persian": "fa",
    "finnish": "fi",
    "faroese": "fo",
    "french": "fr",
    "galician": "gl",
    "gujarati": "gu",
    "hausa": "ha",
    "hawaiian": "haw",
    "hebrew": "he",
    "hindi": "hi",
    "croatian": "hr",
    "haitian creole": "ht",
    "hungarian": "hu",
    "armenian": "hy",
    "indonesian": "id",
    "icelandic": "is",
    "italian": "it",
    "japanese": "ja",
    "javanese": "jv",
    "georgian": "ka",
    "kazakh": "kk",
    "khmer": "km",
    "kannada": "kn",
    "korean": "ko",
    "latin": "la",
    "luxembourgish": "lb",
    "lingala": "ln",
    "lao": "lo",
    "lithuanian": "lt",
    "latvian": "lv",
    "malagasy": "mg",
    "maori": "mi",
    "macedonian": "mk",
    "malayalam": "ml",
    "mongolian": "mn",
    "marathi": "mr",
    "malay": "ms",
    "maltese": "mt",
    "myanmar": "my",
    "nepali": "ne",
    "dutch": "nl",
    "nynorsk": "nn",
    "norwegian": "no",
    "occitan": "oc",
    "punjabi": "pa",
    "polish": "pl",
    "pashto": "ps",
    "portuguese": "pt",
    "romanian": "ro",
    "russian": "ru",
    "sanskrit": "sa",
    "sindhi": "sd",
    "sinhala": "si",
    "slovak": "sk",
    "slovenian": "sl",
    "shona": "sn",
    "somali": "so",
    "albanian": "sq",
    "serbian": "sr",
    "sundanese": "su",
    "swedish": "sv",
    "swahili": "sw",
    "tamil": "ta",
    "telugu": "te",
    "tajik": "tg",
    "thai": "th",
    "turkmen": "tk",
    "tagalog": "tl",
    "turkish": "tr",
    "tatar": "tt",
    "ukrainian": "uk",
    "urdu": "ur",
    "uzbek": "uz",
    "vietnamese": "vi",
    "yiddish": "yi",
    "yoruba": "yo",
    "cantonese": "yue",
    "chinese": "zh",
}
# Other names Whisper accepts for the same languages.
ALIASES: dict[str, str] = {
    "burmese": "my",
    "castilian": "es",
    "flemish": "nl",
    "haitian": "ht",
    "letzeburgesch": "lb",
    "mandarin": "zh",
    "moldavian": "ro",
    "moldovan": "ro",
    "panjabi": "pa",
    "pushto": "ps",
    "sinhalese": "si",
    "valencian": "ca",
}
# Whisper's codes that are not the ISO ones.
CODE_FIXES: dict[str, str] = {"jw": "jv"}

_BY_NAME = {**WHISPER_NAMES, **ALIASES}
CODES = frozenset(_BY_NAME.values())


def iso_language(value: object) -> str | None:
    """The ISO-639-1 code of a language given by Whisper's name or code ("English", "en", "en-US",
    "jw"); None for anything else (an unknown language is not stored as if it were a code)."""
    if not isinstance(value, str):
        return None
    key = " ".join(value.strip().lower().replace("_", "-").split())
    if not key:
        return None
    if key in _BY_NAME:
        return _BY_NAME[key]
    code = CODE_FIXES.get(key, key)
    if code in CODES:
        return code
    base = CODE_FIXES.get(key.split("-", 1)[0], key.split("-", 1)[0])  # a locale: "pt-br" -> "pt"
    return base if base in CODES else None
