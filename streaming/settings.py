"""Settings of ``speechlm serve``: the ServerConfig dataclass and its command-line options.

Kept free of torch so that ``speechlm --help`` stays fast.
"""

from __future__ import annotations

import argparse
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from ..codec.errors import SpeechLMError
from . import protocol

WEB_DIR = Path(__file__).parent / "web"
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


@dataclass
class ServerConfig:
    """Everything ``speechlm serve`` can set. Defaults are safe for a laptop."""

    host: str = "127.0.0.1"
    port: int = 8998  # 0 picks a free port (see DuplexServer.port)
    token: str | None = None  # required to bind a non-loopback host
    allowed_origins: tuple[str, ...] = ()  # extra browser origins ("*" = any); same-origin pages always work
    max_sessions: int = 32
    # load-based admission: a new session is also refused (ERROR server_full) while the frame clock is at its
    # real-time capacity: over the last admit_window seconds of ticks, the model step's p90 above admit_load of the
    # frame period, or more than 5 % of the ticks late, or the answer assist's speech falling behind
    # (DuplexServer.capacity_error). None = up to max_sessions
    admit_load: float | None = 0.8
    admit_window: float = 5.0
    max_message_bytes: int = protocol.MAX_MESSAGE_BYTES  # larger messages: ERROR bad_message, dropped
    max_frame_bytes: int = 256 * 1024  # websocket frames larger than this close the connection (1009)
    idle_timeout: float = 30.0  # seconds without any message from the client
    handshake_timeout: float = 10.0
    input_seconds: float = 2.0  # per-session jitter buffer (user audio)
    output_seconds: float = 2.0  # per-session outbound queue; beyond it the oldest frames are dropped
    max_bad_messages: int = 100  # malformed messages before the session is closed
    max_pending_events: int = 256  # queued replies (ERROR, pong, METADATA) per session
    # Model selection for the command line (run_server builds it when no model is passed).
    model: str = "duplex"  # "duplex" (a trained duplex LM, see lm), "echo" (codec loopback), "loopback" (the audio as it came) or "silence"
    codec: str = "codec-16k"  # codec name or directory for the echo and duplex models
    lm: str | None = "duplex-default"  # duplex LM directory or shipped name (speechlm train lm --stage duplex)
    # answer assist (speechlm.streaming.assist): this speech LM hears the question and writes the duplex
    # model's words; None = the duplex model says its own words
    assist: str | None = "speechlm-default"
    assist_voice: str = "speech_lm"  # who says the assisted reply: "speech_lm" (its TTS) or "duplex" (the duplex model)
    voice: str = "default"  # assist_voice "speech_lm": in which of the speech LM's voices (speechlm tts --list-voices)
    assist_views: int | None = None  # views of the question's audio the speech LM hears (None = AssistConfig's: 2; 1 = plain greedy, faster)
    # one-word edits of the question's transcript checked against its sounds (None = AssistConfig's: 0, off;
    # 3 = the offline ASR's default: questions heard right far more often, the reply ~0.4 s later on one CPU thread)
    assist_check_rounds: int | None = None
    # the speech detector the assist asks whether a question holds speech at all (None here = AssistConfig's: vad-en;
    # "none" = off: any sound over the gate is a question)
    assist_speech_detector: str | None = None
    # the duplex model hears the user through a noise gate (speechlm.streaming.gate): their pauses as
    # digital silence, as in its training dialogues; False = as they are (a faint room kept it from replying)
    noise_gate: bool = True
    # the noise gate asks this speech detector (speechlm.vad), frame by frame, whether a sound over its level threshold
    # is speech: in a room louder than -40 dBFS the level alone kept the user talking and the model never replied;
    # None = the level alone
    gate_detector: str | None = "vad-en"
    device: str = "auto"
    threads: int | None = None  # torch threads for the model step (None: leave torch's default)
    compile_codec: bool = False  # AOTInductor-compiled codec steps (speechlm.codec.compiled): compiled once, cached
    cuda_graphs: bool = False  # duplex model on CUDA: the LM backbone's forward replayed from CUDA graphs
    # the duplex LM's and the assist's compute dtype: float32, bfloat16, or auto = bfloat16 on CUDA and on CPUs that
    # compute it natively (AVX512-BF16, AMX: more sessions held, the same turn-taking, docs/benchmarks.md), else
    # float32 (speechlm.speech.fast_dtype). The codec runs in float32.
    dtype: str = "auto"
    web_dir: Path = field(default_factory=lambda: WEB_DIR)

    def check(self) -> None:
        """Raise SpeechLMError for a config that must not run (e.g. an open bind without a token)."""
        if not is_loopback(self.host) and not self.token:
            raise SpeechLMError(
                f"refusing to bind {self.host or 'all interfaces'} without --token: anyone on the network could use the model; "
                "pass --token SECRET (clients send it as ?token= or in the handshake) or bind 127.0.0.1"
            )
        if self.model == "duplex" and not self.lm:
            raise SpeechLMError("--model duplex needs --lm DIR (a model trained with speechlm train lm --stage duplex)")
        if self.max_sessions < 1:
            raise SpeechLMError(f"max_sessions must be >= 1, got {self.max_sessions}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise SpeechLMError(f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        if not 0 <= self.port <= 65535:
            raise SpeechLMError(f"port must be in 0..65535, got {self.port}")
        if self.admit_load is not None and self.admit_load <= 0:
            raise SpeechLMError(f"admit_load must be > 0 (a share of the frame period) or None (off), got {self.admit_load}")
        for name in ("idle_timeout", "handshake_timeout", "input_seconds", "output_seconds", "admit_window"):
            if getattr(self, name) <= 0:
                raise SpeechLMError(f"{name} must be > 0, got {getattr(self, name)}")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``speechlm serve``; ``config_from_args`` turns them into a ServerConfig."""
    d = ServerConfig()
    parser.add_argument("--host", default=d.host, help=f"interface to bind (default {d.host}; anything else needs --token)")
    parser.add_argument("--port", type=int, default=d.port, help=f"TCP port (default {d.port}; 0 picks a free one)")
    parser.add_argument("--token", help="shared secret clients must present (?token=... or in the handshake)")
    parser.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="extra browser origin allowed to connect (repeatable; '*' for any)",
    )
    parser.add_argument(
        "--model", choices=("duplex", "echo", "loopback", "silence"), default=d.model,
        help="duplex: the duplex LM named by --lm (default); echo: codec loopback; loopback: your audio back as it came, a frame "
             "later (try a client or the wire's codec); silence: answers nothing"
    )
    parser.add_argument("--codec", default=d.codec, help=f"codec name or directory for the echo and duplex models (default {d.codec})")
    parser.add_argument("--lm", default=d.lm, help=f"--model duplex: the duplex LM, a directory or shipped name (default {d.lm})")
    parser.add_argument(
        "--assist",
        default=d.assist,
        help=f"--model duplex: a speech LM (directory or shipped name) that hears each question and writes the duplex model's words; "
        f"'none' = the duplex model alone (default {d.assist})",
    )
    parser.add_argument(
        "--assist-voice",
        choices=("speech_lm", "duplex"),
        default=d.assist_voice,
        help=f"who says the assisted reply: the speech LM's TTS or the duplex model's own voice (default {d.assist_voice})",
    )
    parser.add_argument(
        "--voice",
        default=d.voice,
        help="the assisted replies (--assist-voice speech_lm) in this voice of the speech LM (its voice adapter; "
        f"speechlm tts --list-voices; default {d.voice}: its own)",
    )
    parser.add_argument(
        "--assist-views",
        type=int,
        default=d.assist_views,
        help="views of the question's audio the assist's ASR hears: more transcribe better, 1 answers sooner (default 2)",
    )
    parser.add_argument(
        "--assist-check-rounds",
        type=int,
        default=d.assist_check_rounds,
        help="check the assist's transcript of each question against its sounds, at most this many one-word edits: "
        "questions heard right far more often, the reply later (default 0 = off; 3 as offline ASR)",
    )
    parser.add_argument(
        "--assist-speech-detector",
        metavar="NAME|none",
        default=d.assist_speech_detector,
        help="the speech detector that decides whether the user's sound held speech to answer (default vad-en; "
        "'none': any sound over the gate is a question, noise too)",
    )
    parser.add_argument(
        "--no-noise-gate",
        dest="noise_gate",
        action="store_false",
        help="the duplex model hears the user's pauses as they are (default: through a noise gate, as digital silence)",
    )
    parser.add_argument(
        "--gate-detector",
        metavar="NAME|none",
        default=d.gate_detector,
        help=f"the speech detector the noise gate asks, frame by frame, whether a sound is speech (default {d.gate_detector}; "
        "'none': the level alone, and a room louder than -40 dBFS is heard as the user talking)",
    )
    parser.add_argument("--device", default=d.device, help="auto, cpu or cuda[:N] (default auto)")
    parser.add_argument("--threads", type=int, help="torch threads for the model step (default: torch's choice)")
    parser.add_argument(
        "--compile-codec",
        action="store_true",
        help="run the codec's frame steps compiled with AOTInductor (2-3x faster on CPU; the first run compiles for about a minute and caches it; needs g++)",
    )
    parser.add_argument(
        "--cuda-graphs", action="store_true", help="duplex model on a GPU: replay the LM backbone's forward from CUDA graphs (fewer kernel launches per tick)"
    )
    parser.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16"),
        default=d.dtype,
        help="compute dtype of the duplex LM and the assist's speech LM (default auto: bfloat16 on CUDA and on CPUs with native bfloat16, else float32)",
    )
    parser.add_argument("--max-sessions", type=int, default=d.max_sessions, help=f"concurrent sessions (default {d.max_sessions})")
    parser.add_argument(
        "--admit-load",
        type=_admit_load,
        default=d.admit_load,
        metavar="SHARE",
        help="refuse new sessions (server_full) while the model step's p90 over the last "
        f"{d.admit_window:g} s is above this share of the frame period, or 5%% of the ticks are late, or the assist's speech falls behind; 'off' = admit up to "
        f"--max-sessions (default {d.admit_load:g})",
    )
    parser.add_argument(
        "--idle-timeout", type=float, default=d.idle_timeout, help=f"seconds without a message before closing (default {d.idle_timeout:g})"
    )
    parser.add_argument(
        "--output-seconds",
        type=float,
        default=d.output_seconds,
        help=f"per-session outbound queue; older frames are dropped (default {d.output_seconds:g})",
    )


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        host=args.host,
        port=args.port,
        token=args.token,
        allowed_origins=tuple(args.allow_origin),
        model=args.model,
        codec=args.codec,
        lm=getattr(args, "lm", None),
        assist=none_or(getattr(args, "assist", None)),
        assist_voice=getattr(args, "assist_voice", "speech_lm"),
        voice=getattr(args, "voice", ServerConfig.voice),
        assist_views=getattr(args, "assist_views", ServerConfig.assist_views),
        assist_check_rounds=getattr(args, "assist_check_rounds", ServerConfig.assist_check_rounds),
        assist_speech_detector=getattr(args, "assist_speech_detector", ServerConfig.assist_speech_detector),
        noise_gate=getattr(args, "noise_gate", True),
        gate_detector=none_or(getattr(args, "gate_detector", ServerConfig.gate_detector)),
        device=args.device,
        threads=args.threads,
        compile_codec=getattr(args, "compile_codec", False),
        cuda_graphs=getattr(args, "cuda_graphs", False),
        dtype=getattr(args, "dtype", ServerConfig.dtype),
        max_sessions=args.max_sessions,
        admit_load=getattr(args, "admit_load", ServerConfig.admit_load),
        idle_timeout=args.idle_timeout,
        output_seconds=args.output_seconds,
    )


def none_or(name: str | None) -> str | None:
    """A model name from the command line: 'none' (any case) is None."""
    return None if name is None or str(name).lower() == "none" else name


def _admit_load(text: str) -> float | None:
    if text.strip().lower() in ("off", "none"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a share of the frame period (e.g. 0.9) or 'off', got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def is_loopback(host: str | None) -> bool:
    if not host:
        return False  # "" / None bind every interface
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # another host name: it may resolve to anything
