"""Voice selection per vendor for BCP-47 language codes and gender (pure functions, no I/O).

Order, as in the reference service but with tables that actually match BCP-47: an explicit voice id wins;
then the flow-manager variable ``voipbin.tts.<vendor>.voice_id`` (when the caller has the variables); then
a small per-vendor table keyed by the normalised language tag (``en-US``, ``ja-JP``...), with a language
alone (``ja``) taking its usual region; then the vendor's default. The Go service keyed its tables by names
like ``english_female``, so no request ever matched and every caller got the English default.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from tts_streamer.adapters.voice import VoiceSpec

VENDORS = ("elevenlabs", "gcp", "aws")
ELEVENLABS_VOICE_ID_LENGTH = 20  # voice ids are 20 characters; anything else is not one

# A language alone takes this region (the most common one for the language).
_DEFAULT_REGION = {
    "ar": "XA", "bn": "IN", "cmn": "CN", "da": "DK", "de": "DE", "en": "US", "es": "ES", "fi": "FI",
    "fr": "FR", "gu": "IN", "hi": "IN", "id": "ID", "it": "IT", "ja": "JP", "kn": "IN", "ko": "KR",
    "ml": "IN", "mr": "IN", "nb": "NO", "nl": "NL", "pl": "PL", "pt": "BR", "ru": "RU", "sv": "SE",
    "ta": "IN", "te": "IN", "th": "TH", "tr": "TR", "uk": "UA", "vi": "VN", "zh": "CN",
}  # fmt: skip
# Chinese as Google and Polly spell it.
_ALIASES = {
    "zh-CN": "cmn-CN",
    "zh-Hans-CN": "cmn-CN",
    "zh-TW": "cmn-TW",
    "zh-Hant-TW": "cmn-TW",
    "no-NO": "nb-NO",
}

# Google: only Chirp 3 HD voices stream; a voice is "<locale>-Chirp3-HD-<Name>" for every supported locale.
_GCP_LOCALES = """ar-XA bn-IN cmn-CN da-DK de-DE en-AU en-GB en-IN en-US es-ES es-US fi-FI fr-CA fr-FR gu-IN
hi-IN id-ID it-IT ja-JP kn-IN ko-KR ml-IN mr-IN nb-NO nl-BE nl-NL pl-PL pt-BR ru-RU sv-SE ta-IN te-IN th-TH
tr-TR uk-UA vi-VN"""
GCP_LOCALES = frozenset(_GCP_LOCALES.split())
GCP_NAMES = {"female": "Aoede", "male": "Charon", "": "Charon"}
GCP_DEFAULT = "en-US-Chirp3-HD-Charon"

# Polly: (female, male) neural voices per locale; a missing gender takes the other one.
AWS_VOICES: dict[str, tuple[str, str | None]] = {
    "en-US": ("Joanna", "Matthew"), "en-GB": ("Amy", "Brian"), "en-AU": ("Olivia", None),
    "en-IN": ("Kajal", None), "de-DE": ("Vicki", "Daniel"), "fr-FR": ("Lea", "Remi"),
    "fr-CA": ("Gabrielle", "Liam"), "es-ES": ("Lucia", "Sergio"), "es-US": ("Lupe", "Pedro"),
    "it-IT": ("Bianca", "Adriano"), "ja-JP": ("Kazuha", "Takumi"), "ko-KR": ("Seoyeon", None),
    "cmn-CN": ("Zhiyu", None), "pt-BR": ("Camila", "Thiago"), "hi-IN": ("Kajal", None),
    "nl-NL": ("Laura", None), "pl-PL": ("Ola", None), "sv-SE": ("Elin", None), "da-DK": ("Sofie", None),
    "fi-FI": ("Suvi", None), "nb-NO": ("Ida", None), "tr-TR": ("Burcu", None), "ar-XA": ("Hala", "Zayd"),
}  # fmt: skip
AWS_DEFAULT = "Joanna"

# ElevenLabs: premade voices are multilingual (the model speaks the text's language); pick by gender.
ELEVENLABS_VOICES = {"female": "EXAVITQu4vr4xnSDxMaL", "male": "JBFqnCBsd6RMkjVDRZzb"}
ELEVENLABS_DEFAULT = "EXAVITQu4vr4xnSDxMaL"


@attrs.frozen
class ResolvedVoice:
    """What to ask a vendor for. ``source``: explicit | flow_variable | table | default."""

    vendor: str
    voice_id: str
    language: str
    source: str


def normalize_language(tag: str) -> str:
    """``en_us`` -> ``en-US``, ``JA`` -> ``ja-JP``, ``zh-CN`` -> ``cmn-CN``; empty -> ``en-US``."""
    parts = [p for p in tag.strip().replace("_", "-").split("-") if p]
    if not parts:
        return "en-US"
    lang = parts[0].lower()
    rest = [p.title() if len(p) == 4 else p.upper() if len(p) == 2 or p.isdigit() else p for p in parts[1:]]
    region = next((p for p in rest if len(p) == 2 or p.isdigit()), None)
    if region is None:
        region = _DEFAULT_REGION.get(lang)
        if region is None:
            return lang
        rest.append(region)
    full = "-".join([lang, *rest])
    short = f"{lang}-{region}"
    return _ALIASES.get(full, _ALIASES.get(short, short))


def normalize_gender(gender: str) -> str:
    g = gender.strip().lower()
    return {"f": "female", "female": "female", "woman": "female", "m": "male", "male": "male"}.get(g, "")


def flow_variable_name(vendor: str) -> str:
    """The flow-manager variable that may carry a voice id for ``vendor`` (elevenlabs, gcp, aws)."""
    return f"voipbin.tts.{vendor}.voice_id"


def voice_from_variables(vendor: str, variables: Mapping[str, str]) -> str | None:
    """The voice id a flow's variables ask for, if any and plausible for the vendor."""
    value = variables.get(flow_variable_name(vendor), "")
    value = value.strip() if isinstance(value, str) else ""
    if not value:
        return None
    if vendor == "elevenlabs" and len(value) != ELEVENLABS_VOICE_ID_LENGTH:
        return None
    return value


def select_voice(vendor: str, spec: VoiceSpec, variables: Mapping[str, str] | None = None) -> ResolvedVoice:
    """Pick the voice ``vendor`` should speak ``spec`` with."""
    language = normalize_language(spec.language)
    if spec.voice_id:
        return ResolvedVoice(vendor, spec.voice_id, language, "explicit")
    from_flow = voice_from_variables(vendor, variables or {})
    if from_flow:
        return ResolvedVoice(vendor, from_flow, language, "flow_variable")
    gender = normalize_gender(spec.gender)
    if vendor == "gcp":
        if language in GCP_LOCALES:
            return ResolvedVoice(vendor, f"{language}-Chirp3-HD-{GCP_NAMES[gender]}", language, "table")
        return ResolvedVoice(vendor, GCP_DEFAULT, "en-US", "default")
    if vendor == "aws":
        pair = AWS_VOICES.get(language)
        if pair is None:
            return ResolvedVoice(vendor, AWS_DEFAULT, "en-US", "default")
        female, male = pair
        voice = male if gender == "male" and male else female
        return ResolvedVoice(vendor, voice, language, "table")
    if vendor == "elevenlabs":
        voice = ELEVENLABS_VOICES.get(gender, ELEVENLABS_DEFAULT)
        return ResolvedVoice(vendor, voice, language, "table" if gender else "default")
    raise ValueError(f"unknown vendor {vendor!r}; expected one of {VENDORS}")


def gcp_language_of(voice_name: str) -> str | None:
    """The locale at the front of a Google voice name (``ja-JP-Chirp3-HD-Kore`` -> ``ja-JP``)."""
    parts = voice_name.split("-")
    return "-".join(parts[:2]) if len(parts) >= 3 else None
