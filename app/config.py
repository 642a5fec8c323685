"""The service's settings: one class, every field from a ``GRADUNC_*`` environment variable.

Build them with :func:`get_settings` (cached) and hand them to ``app.main.create_app``;
tests build their own ``Settings(...)`` and pass those instead. A bad value is rejected at
start-up with a message that names the environment variable, the value and the limit.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = ["ENV_PREFIX", "Settings", "get_settings", "DEFAULT_BUNDLE_DIR"]

ENV_PREFIX = "GRADUNC_"
#: Shortest API key accepted: 16 random printable characters are far beyond guessing
#: through a throttled HTTP endpoint.
MIN_API_KEY_LENGTH = 16


def _default_bundle_dir() -> Path:
    """The committed default bundle, shipped with the package as ``gradunc_models``.

    Installed (editable or not), ``gradunc_models`` is the checkout's ``models/`` folder
    or its copy in site-packages, so the default does not depend on the working
    directory. Run from a source tree that was never installed, the bundle is the
    ``models/default`` beside the ``app`` package. The Docker image sets
    ``GRADUNC_BUNDLE_DIR`` explicitly.
    """
    try:
        from gradunc_models import DEFAULT_BUNDLE_DIR as shipped
    except ImportError:
        return Path(__file__).resolve().parents[1] / "models" / "default"
    return shipped


DEFAULT_BUNDLE_DIR = _default_bundle_dir()


def _default_database_url() -> str:
    """A SQLite file in the user's state directory (``$XDG_STATE_HOME``, else
    ``~/.local/state``): outside the checkout and the package, kept across restarts.
    docker-compose.yml points GRADUNC_DATABASE_URL at a volume instead."""
    state_home = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return f"sqlite:///{Path(state_home) / 'gradient-uncertainty' / 'live.sqlite3'}"


def _var(field: str) -> str:
    return f"{ENV_PREFIX}{field.upper()}"


class Settings(BaseSettings):
    """Configuration of the scoring service (environment variables ``GRADUNC_<FIELD>``)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="ignore",
        validate_default=True,
        # Start-up errors never echo an input: one of them may be the API key. Every
        # message of ours quotes the offending value itself where that is safe.
        hide_input_in_errors=True,
        frozen=True,
    )

    bundle_dir: Path = DEFAULT_BUNDLE_DIR
    """Model bundle folder to load (``manifest.json`` inside); relative paths are taken
    from the working directory. Default: ``models/default`` of the source checkout."""

    host: str = "127.0.0.1"
    """Interface ``gradient-uncertainty-serve`` binds to; ``0.0.0.0`` in a container."""

    port: int = 8000
    """TCP port ``gradient-uncertainty-serve`` listens on (1-65535)."""

    log_level: str = "info"
    """uvicorn log level: critical, error, warning, info, debug or trace."""

    max_body_bytes: int = 32 * 1024 * 1024
    """Largest request body accepted, in bytes. Checked from Content-Length before reading
    and counted while streaming (chunked bodies); a larger body is answered 413."""

    max_image_pixels: int = 16_000_000
    """Most pixels decoded for one image (width x height from the header, before any pixel
    is decoded; a large JPEG counts at the reduced size libjpeg decodes it at); more is
    answered 413. A digit needs a few thousand pixels; 16 megapixels still takes a full
    scan or screenshot and costs up to about 2.5 s and 850 MB to decode (with alpha)."""

    max_image_frames: int = 100
    """Most frames an animated image (GIF, WebP, PNG, TIFF) may declare; only the first is
    decoded. More is answered 413."""

    max_request_pixels: int = 32_000_000
    """Decode budget of one request: the pixels times frames of all its images together
    (checked from the headers before any image is decoded); more is answered 413."""

    decode_workers: int = 2
    """Worker processes that decode and preprocess uploaded images, one request at a time
    each; the serving process never decodes an upload itself."""

    decode_timeout_s: float = 10.0
    """Longest time the decoding of one request's images may take, in seconds; then its
    worker is stopped (and replaced) and the request answered 413."""

    decode_memory_mb: int = 1024
    """Memory a decode worker may allocate on top of its size after start-up, in MiB
    (``RLIMIT_AS``); a decode that needs more is answered 413 (or 422 where the decoder
    reports the failure as corrupt data)."""

    max_batch_images: int = 256
    """Most images one POST /score/batch request may carry; more is answered 413."""

    max_batch_size: int = 64
    """Most images the dynamic batcher hands the engine in one call. Concurrent requests
    are gathered into batches of up to this many images; larger requests are split."""

    max_wait_ms: float = 2.0
    """How long the batcher holds a partial batch open for requests that are already being
    received or decoded, in milliseconds. It never waits when no other request is on its
    way, so a lone client pays nothing for batching."""

    queue_max: int = 1024
    """Most images admitted and not yet scored (waiting, decoding or queued). Beyond it
    requests are answered 503 with Retry-After. Must be at least ``max_batch_images``."""

    api_key: SecretStr | None = None
    """If set, the scoring endpoints require ``Authorization: Bearer <api_key>`` (every
    endpoint but /healthz and /readyz with ``protect_all_endpoints``). At least
    ``MIN_API_KEY_LENGTH`` (16) characters of printable ASCII; e.g.
    ``python -c 'import secrets; print(secrets.token_urlsafe(32))'``."""

    protect_all_endpoints: bool = False
    """With an API key: require it on every endpoint except /healthz and /readyz (the
    report, the metrics, the OpenAPI page), not only on the scoring endpoints."""

    auth_max_failures: int = 10
    """Wrong API keys one client address may send within ``auth_failure_window_s``; after
    that every request of that client that needs the key is answered 429 until the
    window ends (a correct key too: otherwise guessing would go on)."""

    auth_failure_window_s: float = 60.0
    """Length of the window over which wrong API keys are counted, in seconds."""

    bundle_public_key: Path | None = None
    """An Ed25519 public key (PEM file). When set, the bundle's manifest must carry a valid
    signature by the matching private key (``manifest.sig``, written by
    ``python -m training sign``), checked before anything of the bundle is loaded; an
    unsigned or wrongly signed bundle is refused. Default: no signature is required."""

    header_timeout_s: float = 10.0
    """Longest time a client may take to send a request line and its headers, from the
    connection's start or from the end of its previous response, in seconds; then the
    connection is answered 408 (or closed when nothing was sent)."""

    body_timeout_s: float = 15.0
    """Longest time a client may take to send a request body, from the end of its headers,
    in seconds (the slow-upload deadline); then it is answered 408 and the connection
    closed. After SIGTERM, a slow upload is closed at this deadline too."""

    keep_alive_timeout_s: int = 5
    """How long an idle keep-alive connection stays open between requests, in seconds."""

    max_header_bytes: int = 16 * 1024
    """Largest request line plus headers, in bytes; a larger one is answered 431."""

    max_header_count: int = 100
    """Most request headers; more are answered 431."""

    forwarded_allow_ips: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Addresses (comma-separated IPs or networks, or ``*``) of reverse proxies whose
    ``X-Forwarded-For`` / ``X-Forwarded-Proto`` are believed. Default: none, so clients
    cannot forge their address; set it to the proxy's address behind a proxy."""

    providers: Annotated[list[str] | None, NoDecode] = None
    """onnxruntime execution providers in order of preference, comma-separated, e.g.
    ``CUDAExecutionProvider,CPUExecutionProvider``. Default: the runtime's choice (CUDA
    when available, else CPU). GET /readyz says which one each graph really runs on."""

    engine_threads: int | None = None
    """Intra-op threads of each onnxruntime session; default: the cores, at most 4. Batches
    of at most 8 images (or of fewer images than threads) run on one-thread copies of the
    sessions, so an image's answer does not depend on the batch it was scored in."""

    head_threads: int = 1
    """OpenMP threads the heads' boosted trees predict with (set once for the process,
    with threadpoolctl). Default 1: a request's few images are answered faster by one
    thread than by a thread team that has to start and meet for each of the hundreds of
    trees; on this 2-core machine one thread halved the batch-1 latency of the heads and
    kept batch-64 throughput."""

    retry_after_s: int = 1
    """Retry-After (seconds) sent with 503 answers (queue full, bundle still loading)."""

    database_url: str = Field(default_factory=_default_database_url)
    """The live store (served answers and their feedback, never images), a SQLAlchemy URL:
    ``sqlite:///<file>`` or ``postgresql://<user>:<password>@<host>:<port>/<database>``
    (psycopg 3) when several replicas share one. Default: a SQLite file in
    ``$XDG_STATE_HOME/gradient-uncertainty/`` (``~/.local/state/...``). The schema is
    migrated (Alembic) at start-up."""

    store_enabled: bool = True
    """Record what was served for each request id, for POST /feedback and GET
    /metrics/live. Off: neither is available, and nothing is written."""

    store_max_rows: int = 1_000_000
    """Retention by count: the newest this many served rows are kept, older ones deleted."""

    store_max_age_s: float = 30 * 86400.0
    """Retention by age, in seconds (default 30 days): older served rows are deleted."""

    store_buffer_max: int = 100_000
    """Most served records held in memory while the store is slow or unreachable; beyond
    it records are dropped (counted and logged), and scoring goes on."""

    store_timeout_s: float = 5.0
    """Longest wait for the store, in seconds: connecting, SQLite's lock, and POST
    /feedback's commit (503 with Retry-After after it)."""

    live_window_s: float = 86400.0
    """Default window of GET /metrics/live and of its Prometheus gauges, in seconds
    (default one day); the request may ask for another with ``window_s``."""

    live_refresh_s: float = 60.0
    """How often the live Prometheus gauges are recomputed from the store, in seconds (only
    when this process wrote rows or feedback since the last time; GET /metrics/live always
    recomputes them)."""

    feedback_max_items: int = 10_000
    """Most items one POST /feedback request may carry; more is answered 413."""

    @field_validator("providers", mode="before")
    @classmethod
    def _split_providers(cls, value: Any) -> Any:
        if isinstance(value, str):
            names = [name.strip() for name in value.split(",") if name.strip()]
            return names or None
        return value

    @field_validator("providers")
    @classmethod
    def _known_providers(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        # Every provider onnxruntime knows, available here or not: a name outside this set
        # is a typo, not a provider that happens to be missing on this machine.
        import onnxruntime

        known = set(onnxruntime.get_all_providers())
        unknown = [name for name in value if name not in known]
        if unknown:
            raise ValueError(
                f"{_var('providers')} names unknown onnxruntime execution providers "
                f"{unknown!r}; known: {', '.join(sorted(known))}"
            )
        return value

    @field_validator("port")
    @classmethod
    def _valid_port(cls, value: int) -> int:
        if not 1 <= value <= 65535:
            raise ValueError(f"{_var('port')} must be between 1 and 65535, got {value!r}")
        return value

    @field_validator("log_level")
    @classmethod
    def _valid_log_level(cls, value: str) -> str:
        levels = ("critical", "error", "warning", "info", "debug", "trace")
        if value.lower() not in levels:
            raise ValueError(f"{_var('log_level')} must be one of {levels}, got {value!r}")
        return value.lower()

    @field_validator(
        "max_body_bytes",
        "max_image_pixels",
        "max_batch_images",
        "max_batch_size",
        "queue_max",
        "retry_after_s",
        "max_image_frames",
        "max_request_pixels",
        "decode_workers",
        "decode_memory_mb",
        "auth_max_failures",
        "keep_alive_timeout_s",
        "max_header_bytes",
        "max_header_count",
    )
    @classmethod
    def _positive(cls, value: int, info: Any) -> int:
        if value < 1:
            raise ValueError(f"{_var(info.field_name)} must be at least 1, got {value!r}")
        return value

    @field_validator("head_threads")
    @classmethod
    def _at_least_one_head_thread(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"{_var('head_threads')} must be at least 1, got {value!r}")
        return value

    @field_validator("engine_threads")
    @classmethod
    def _positive_or_default(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(
                f"{_var('engine_threads')} must be at least 1 (or unset), got {value!r}"
            )
        return value

    @field_validator("max_wait_ms")
    @classmethod
    def _wait_range(cls, value: float) -> float:
        if not 0 <= value <= 1000:
            raise ValueError(
                f"{_var('max_wait_ms')} must be between 0 and 1000 milliseconds, got {value!r}"
            )
        return value

    @field_validator("api_key")
    @classmethod
    def _usable_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        key = value.get_secret_value()
        if not key:
            return None  # GRADUNC_API_KEY= (empty) means "no key", as in most tooling
        if key != key.strip() or not key.isascii() or not key.isprintable():
            raise ValueError(
                f"{_var('api_key')} must be printable ASCII without surrounding whitespace "
                "(it is sent in an HTTP header)"
            )
        if len(key) < MIN_API_KEY_LENGTH:  # the length only: the key is never echoed
            raise ValueError(
                f"{_var('api_key')} is {len(key)} characters long, shorter than the minimum "
                f"of {MIN_API_KEY_LENGTH}; generate one with "
                "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
            )
        return value

    @field_validator("forwarded_allow_ips", mode="before")
    @classmethod
    def _split_addresses(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [address.strip() for address in value.split(",") if address.strip()]
        return value

    @field_validator("forwarded_allow_ips")
    @classmethod
    def _valid_addresses(cls, value: list[str]) -> list[str]:
        import ipaddress

        for address in value:
            if address == "*":
                continue
            try:
                ipaddress.ip_network(address, strict=False)
            except ValueError:
                raise ValueError(
                    f"{_var('forwarded_allow_ips')}: {address!r} is neither an IP address, "
                    "a network (e.g. 10.0.0.0/8) nor '*'"
                ) from None
        return value

    @field_validator(
        "decode_timeout_s", "auth_failure_window_s", "header_timeout_s", "body_timeout_s"
    )
    @classmethod
    def _positive_duration(cls, value: float, info: Any) -> float:
        if not 0 < value <= 3600:
            raise ValueError(
                f"{_var(info.field_name)} must be more than 0 and at most 3600 seconds, "
                f"got {value!r}"
            )
        return value

    @field_validator("bundle_public_key")
    @classmethod
    def _readable_public_key(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"{_var('bundle_public_key')}: no file at {value}")
        return value

    @field_validator("database_url")
    @classmethod
    def _usable_database_url(cls, value: str) -> str:
        from app.store.database import parse_database_url

        try:
            parse_database_url(value)
        except ValueError as error:
            raise ValueError(f"{_var('database_url')}: {error}") from None
        return value

    @field_validator("store_max_rows", "store_buffer_max", "feedback_max_items")
    @classmethod
    def _positive_count(cls, value: int, info: Any) -> int:
        if value < 1:
            raise ValueError(f"{_var(info.field_name)} must be at least 1, got {value!r}")
        return value

    @field_validator("store_max_age_s", "store_timeout_s", "live_window_s", "live_refresh_s")
    @classmethod
    def _positive_seconds(cls, value: float, info: Any) -> float:
        if not value > 0 or value == float("inf"):
            raise ValueError(
                f"{_var(info.field_name)} must be a positive number of seconds, got {value!r}"
            )
        return value

    @model_validator(mode="after")
    def _queue_holds_a_batch(self) -> Settings:
        if self.queue_max < self.max_batch_images:
            raise ValueError(
                f"{_var('queue_max')} ({self.queue_max}) must be at least "
                f"{_var('max_batch_images')} ({self.max_batch_images}), or a full-size batch "
                "request could never be admitted"
            )
        return self

    @property
    def max_wait_s(self) -> float:
        return self.max_wait_ms / 1000.0


@lru_cache
def get_settings() -> Settings:
    """The settings from the environment, read once per process."""
    return Settings()
