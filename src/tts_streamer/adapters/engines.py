"""Build the voice engines a deployment has credentials for, from environment-style settings.

``build_engines(env)`` returns the available engines by name plus, for each vendor that is not
available, a human-readable reason (for startup logs and ``/health/ready``). ``espeak`` is always there;
``fallback`` is added when ``VOICE_FALLBACK_CHAIN`` names at least one available engine. Nothing here
touches the network: credentials are loaded, never checked against the vendor (the first request does).
See docs/vendors.md for every variable.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import trio

from tts_streamer.adapters.voice import VoiceEngine

log = logging.getLogger(__name__)

ALIASES = {"google": "gcp", "gcp": "gcp", "polly": "aws", "aws": "aws", "elevenlabs": "elevenlabs"}
ALIASES |= {"espeak": "espeak", "offline": "espeak"}
ALIASES |= {"piper": "piper"}
_TRUE = {"1", "true", "yes", "on"}


def build_engines(env: Mapping[str, str]) -> tuple[dict[str, VoiceEngine], dict[str, str]]:
    engines: dict[str, VoiceEngine] = {}
    unavailable: dict[str, str] = {}
    for name, factory in (("elevenlabs", _elevenlabs), ("gcp", _google), ("aws", _polly)):
        try:
            engine, reason = factory(env)
        except Exception as exc:  # a broken setting must not stop the daemon: that vendor is off
            engine, reason = None, f"{type(exc).__name__}: {exc}"
        if engine is not None:
            engines[name] = engine
        else:
            unavailable[name] = reason
            log.warning("voice %s unavailable: %s", name, reason)
    from tts_streamer.adapters.espeak import EspeakEngine

    try:
        espeak_workers = int(_float(env, "ESPEAK_WORKERS", 0)) or None  # None: one per core
        engines["espeak"] = EspeakEngine(workers=espeak_workers)
    except ValueError as exc:  # the offline voice must exist: a bad setting falls back to the default
        log.error("ESPEAK_WORKERS: %s; using one worker per core", exc)
        engines["espeak"] = EspeakEngine()
    try:
        piper, reason = _piper(env, engines["espeak"])
    except Exception as exc:  # e.g. a bad PIPER_MAX_STREAMS: the daemon runs on without Piper
        piper, reason = None, f"{type(exc).__name__}: {exc}"
    if piper is not None:
        engines["piper"] = piper
    else:
        unavailable["piper"] = reason
        log.info("voice piper unavailable: %s", reason)
    chain_setting = env.get("VOICE_FALLBACK_CHAIN", "").strip()
    if chain_setting:
        fallback, reason = _fallback(env, chain_setting, engines)
        if fallback is not None:
            engines["fallback"] = fallback
        else:
            unavailable["fallback"] = reason
    return engines, unavailable


async def warm_engine(engine: VoiceEngine, *, within: float) -> str:
    """Run ``engine.warm()`` if it has one (connections, TLS, credentials up before the first call),
    bounded by ``within`` seconds. Returns "" when warm (or nothing to warm), else why not: never raises, a
    cold vendor still works, its first call just pays for the set-up."""
    warm: Callable[[], Awaitable[None]] | None = getattr(engine, "warm", None)
    if warm is None:
        return ""
    try:
        with trio.fail_after(within):
            await warm()
    except trio.TooSlowError:
        return f"warm-up took longer than {within:g} s"
    except Exception as exc:
        return f"warm-up failed: {type(exc).__name__}: {exc}"
    return ""


async def warm_engines(engines: Mapping[str, VoiceEngine], *, within: float) -> dict[str, str]:
    """Warm every engine at once; ``{name: reason}`` for those that did not warm."""
    failed: dict[str, str] = {}

    async def one(name: str, engine: VoiceEngine) -> None:
        started = trio.current_time()
        reason = await warm_engine(engine, within=within)
        if reason:
            failed[name] = reason
            log.warning("voice %s not warmed: %s", name, reason)
        elif getattr(engine, "warm", None) is not None:
            log.info("voice %s warmed in %.0f ms", name, (trio.current_time() - started) * 1000)

    async with trio.open_nursery() as nursery:
        for name, engine in engines.items():
            nursery.start_soon(one, name, engine)
    return failed


@runtime_checkable
class Closable(Protocol):
    """An engine holding something past its streams (espeak: its thread; Google: its channel)."""

    async def aclose(self) -> None: ...


async def close_engines(engines: Mapping[str, VoiceEngine], *, within: float) -> None:
    """Close each engine once (a fallback chain names engines that are also listed on their own),
    shielded: this runs on the way out, often inside a cancelled scope. Bounded by ``within`` in all."""
    distinct = {id(engine): engine for engine in engines.values() if isinstance(engine, Closable)}
    with trio.CancelScope(shield=True), trio.move_on_after(within) as scope:
        async with trio.open_nursery() as nursery:
            for engine in distinct.values():
                nursery.start_soon(_close_quietly, engine)
    if scope.cancelled_caught:
        log.warning("voices not closed within %s s", within)


async def _close_quietly(engine: Closable) -> None:
    try:
        await engine.aclose()
    except Exception:
        log.exception("voice %s: close failed", getattr(engine, "name", engine))


def _float(env: Mapping[str, str], key: str, default: float) -> float:
    raw = env.get(key, "").strip()
    return float(raw) if raw else default


def _elevenlabs(env: Mapping[str, str]) -> tuple[VoiceEngine | None, str]:
    key = env.get("ELEVENLABS_API_KEY", "").strip()
    if not key:
        return None, "ELEVENLABS_API_KEY is not set"
    from tts_streamer.adapters.elevenlabs import DEFAULT_BASE_URL, DEFAULT_MODEL, ElevenLabsEngine

    timeout = int(_float(env, "ELEVENLABS_INACTIVITY_TIMEOUT", 20))
    engine = ElevenLabsEngine(
        key,
        base_url=env.get("ELEVENLABS_BASE_URL", "").strip() or DEFAULT_BASE_URL,
        model_id=env.get("ELEVENLABS_MODEL_ID", "").strip() or DEFAULT_MODEL,
        inactivity_timeout=timeout,
        keepalive_interval=min(10.0, timeout / 2),
        ssl_context=_ssl_context(env.get("ELEVENLABS_CA_FILE", "").strip()),
    )
    return engine, ""


def _google(env: Mapping[str, str]) -> tuple[VoiceEngine | None, str]:
    import grpc

    from tts_streamer.adapters.google_tts import CHANNEL_OPTIONS, DEFAULT_HOST, GoogleTTSEngine

    endpoint = env.get("GCP_TTS_ENDPOINT", "").strip()
    if endpoint and env.get("GCP_TTS_INSECURE", "").strip().lower() in _TRUE:
        # Plain-text gRPC for loopback fakes and local emulators: no credentials are involved.
        return GoogleTTSEngine(channel=grpc.insecure_channel(endpoint, options=CHANNEL_OPTIONS)), ""
    credentials: Any = None
    path = env.get("GOOGLE_APPLICATION_CREDENTIALS", "").strip()
    scopes = ["https://www.googleapis.com/auth/cloud-platform"]
    if path:
        import google.auth

        load: Any = google.auth.load_credentials_from_file
        credentials, _project = load(path, scopes=scopes)
    elif env.get("GCP_TTS_USE_ADC", "").strip().lower() in _TRUE:
        import google.auth

        credentials, _project = google.auth.default(scopes=scopes)
    else:
        return None, "GOOGLE_APPLICATION_CREDENTIALS is not set (or set GCP_TTS_USE_ADC=1)"
    from google.cloud.texttospeech_v1.services.text_to_speech.transports.grpc import (
        TextToSpeechGrpcTransport,
    )

    host = endpoint or f"{DEFAULT_HOST}:443"
    extra: dict[str, Any] = {}
    ca_file = env.get("GCP_TTS_CA_FILE", "").strip()
    if ca_file:  # trust this CA (a private endpoint or a TLS fake) instead of the system roots
        with open(ca_file, "rb") as handle:
            extra["ssl_credentials"] = grpc.ssl_channel_credentials(root_certificates=handle.read())
    channel = TextToSpeechGrpcTransport.create_channel(
        host, credentials=credentials, options=CHANNEL_OPTIONS, **extra
    )
    return GoogleTTSEngine(channel=channel, credentials=credentials), ""


GO_POLLY_REGION = "eu-central-1"  # the Go tts-manager's fixed Polly region


def aws_settings(env: Mapping[str, str]) -> dict[str, str]:
    """The AWS key pair and region from the SDK's names, else the Go tts-manager's ``AWS_ACCESS_KEY`` /
    ``AWS_SECRET_KEY`` (the SDK name wins per variable when both are set). With only Go's names and no
    region anywhere, Go's fixed region (eu-central-1), as the Go service used."""
    out: dict[str, str] = {}
    for key, sdk, go in (
        ("key_id", "AWS_ACCESS_KEY_ID", "AWS_ACCESS_KEY"),
        ("secret", "AWS_SECRET_ACCESS_KEY", "AWS_SECRET_KEY"),
    ):
        value, source = env.get(sdk, "").strip(), sdk
        if not value:
            value, source = env.get(go, "").strip(), go
        if value:
            out[key], out[key + "_source"] = value, source
    region = env.get("AWS_REGION", "").strip() or env.get("AWS_DEFAULT_REGION", "").strip()
    if region:
        out["region"] = region
    elif out.get("key_id_source") == "AWS_ACCESS_KEY" and not env.get("AWS_PROFILE", "").strip():
        out["region"] = GO_POLLY_REGION
    return out


def _polly(env: Mapping[str, str]) -> tuple[VoiceEngine | None, str]:
    aws = aws_settings(env)
    key_id = aws.get("key_id", "")
    profile = env.get("AWS_PROFILE", "").strip()
    use_chain = env.get("AWS_USE_DEFAULT_CREDENTIALS", "").strip().lower() in _TRUE
    if not (key_id or profile or use_chain):
        return (
            None,
            "no AWS credentials configured (AWS_ACCESS_KEY_ID or Go's AWS_ACCESS_KEY, AWS_PROFILE or "
            "AWS_USE_DEFAULT_CREDENTIALS=1)",
        )
    if key_id and "secret" not in aws:
        return None, f"{aws['key_id_source']} is set but AWS_SECRET_ACCESS_KEY / AWS_SECRET_KEY is not"
    if aws.get("key_id_source") == "AWS_ACCESS_KEY":
        log.info("voice aws: credentials from the Go names AWS_ACCESS_KEY / AWS_SECRET_KEY")
    import boto3

    from tts_streamer.adapters.polly import PollyEngine, make_client

    session = boto3.Session(
        aws_access_key_id=key_id or None,
        aws_secret_access_key=aws.get("secret") or None,
        aws_session_token=env.get("AWS_SESSION_TOKEN", "").strip() or None,
        region_name=aws.get("region"),
        profile_name=profile or None,
    )
    if session.region_name is None:
        return None, "no AWS region configured (AWS_REGION or AWS_DEFAULT_REGION, or in the profile)"
    if session.get_credentials() is None:
        return None, "AWS credentials could not be resolved"
    concurrency = int(_float(env, "POLLY_MAX_CONCURRENCY", 50))
    client = make_client(
        session,
        endpoint_url=env.get("POLLY_ENDPOINT_URL", "").strip() or None,
        max_connections=concurrency,
        read_timeout=_float(env, "POLLY_READ_TIMEOUT", 5.0),
        verify=env.get("AWS_CA_BUNDLE", "").strip() or None,
    )
    engine = PollyEngine(
        client, engine=env.get("POLLY_ENGINE", "").strip() or "neural", max_concurrency=concurrency
    )
    return engine, ""


def _ssl_context(ca_file: str) -> ssl.SSLContext | None:
    """Verification against ``ca_file`` instead of the system roots; None: the adapter's default."""
    return ssl.create_default_context(cafile=ca_file) if ca_file else None


def _fallback(
    env: Mapping[str, str], setting: str, engines: dict[str, VoiceEngine]
) -> tuple[VoiceEngine | None, str]:
    from tts_streamer.adapters.fallback import FallbackEngine

    chain: list[VoiceEngine] = []
    for raw in setting.replace(">", ",").replace("-", ",").split(","):
        name = ALIASES.get(raw.strip().lower())
        if name is None:
            if raw.strip():
                log.warning("VOICE_FALLBACK_CHAIN: unknown voice %r ignored", raw.strip())
            continue
        if name in engines and engines[name] not in chain:
            chain.append(engines[name])
        elif name not in engines:
            log.warning("VOICE_FALLBACK_CHAIN: %s is unavailable and is skipped", name)
    if not chain:
        return None, f"VOICE_FALLBACK_CHAIN={setting!r} names no available voice"
    engine = FallbackEngine(
        chain,
        first_audio_timeout=_float(env, "VOICE_FIRST_AUDIO_TIMEOUT", 2.0),
        stall_timeout=_float(env, "VOICE_STALL_TIMEOUT", 1.0),
        cooldown=_float(env, "VOICE_FALLBACK_COOLDOWN", 10.0),
    )
    return engine, ""


def _piper(env: Mapping[str, str], overflow: VoiceEngine) -> tuple[VoiceEngine | None, str]:
    """Piper when its extra is installed; its model starts loading in a background thread now."""
    from tts_streamer.adapters.piper_model import piper_unavailable_reason

    model = env.get("PIPER_MODEL", "").strip() or None
    reason = piper_unavailable_reason(default_voice=model is None)
    if reason is not None:
        return None, reason
    from tts_streamer.adapters.piper import DEFAULT_MAX_STREAMS, PiperEngine

    engine = PiperEngine(
        model_path=model,
        config_path=env.get("PIPER_MODEL_CONFIG", "").strip() or None,
        workers=int(_float(env, "PIPER_WORKERS", 2)),
        max_streams=int(_float(env, "PIPER_MAX_STREAMS", DEFAULT_MAX_STREAMS)),
        overflow=overflow,
    )
    if env.get("PIPER_PRELOAD", "1").strip().lower() in _TRUE:
        engine.preload()  # in a thread: the first Piper call must not wait for the model
    return engine, ""
