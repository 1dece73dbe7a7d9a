"""The ``speechlm`` command line: one entry point, subcommands, one-line errors.

Every handler raises :class:`SpeechLMError` (or ``FileNotFoundError``) for bad input;
``main`` prints it as ``speechlm: error: ...`` and exits 2.  ``--debug`` shows the
traceback instead.  Heavy imports happen inside handlers so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .codec.errors import SpeechLMError


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n


def _nonnegative_float(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {value!r}") from None
    if not x >= 0 or x == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {value}")
    return x


def _positive_float(value: str) -> float:
    x = _nonnegative_float(value)
    if x == 0:
        raise argparse.ArgumentTypeError("expected a number > 0, got 0")
    return x


def _probability(value: str) -> float:
    x = _nonnegative_float(value)
    if x > 1:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {value}")
    return x


def _seconds_range(value: str) -> tuple[float, float]:
    parts = value.split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX in seconds, got {value!r}")
    low, high = (_nonnegative_float(part) for part in parts)
    if low > high:
        raise argparse.ArgumentTypeError(f"expected MIN <= MAX, got {value!r}")
    return low, high


def _float_pair(value: str, ok, expected: str) -> tuple[float, float]:
    """``"MIN,MAX"`` -> (MIN, MAX) if ``ok(MIN, MAX)``; else an argparse error naming ``expected``."""
    parts = value.split(",")
    try:
        low, high = (float(part) for part in parts) if len(parts) == 2 else (None, None)
    except ValueError:
        low = high = None
    if low is None or not ok(low, high):
        raise argparse.ArgumentTypeError(f"expected MIN,MAX {expected}, got {value!r}")
    return low, high


def _share_range(value: str) -> tuple[float, float]:
    return _float_pair(value, lambda lo, hi: 0.0 <= lo < hi <= 1.0, "shares with 0 <= MIN < MAX <= 1")


def _speed_range(value: str) -> tuple[float, float]:
    return _float_pair(value, lambda lo, hi: 0 < lo <= hi, "speed factors with 0 < MIN <= MAX")


def _db_range(value: str) -> tuple[float, float]:
    return _float_pair(value, lambda lo, hi: lo <= hi, "decibels with MIN <= MAX")


# --- data ---------------------------------------------------------------------------------


def _load_items(args: argparse.Namespace) -> list[dict]:
    from .training import textgen

    if args.texts and args.builtin:
        raise SpeechLMError("give either --texts FILE or --builtin SOURCES, not both")
    if args.texts:
        path = Path(args.texts)
        if not path.is_file():
            raise SpeechLMError(f"texts file not found: {path}")
        try:
            items = list(textgen.iter_text_file(path))
        except UnicodeDecodeError:
            raise SpeechLMError(f"texts file is not UTF-8 text: {path}") from None
        except ValueError as e:
            raise SpeechLMError(str(e)) from None
        if not items:
            raise SpeechLMError(f"texts file has no lines of text: {path}")
        return items
    if args.builtin:
        items = []
        for source in args.builtin.split(","):
            try:
                items += textgen.generate(source.strip(), args.count, split=args.split, seed=args.seed)
            except ValueError as e:
                raise SpeechLMError(str(e)) from None
        if getattr(args, "answers", False):
            items = textgen.answer_items(items)
            if not items:
                raise SpeechLMError(f"--answers: none of the sources {args.builtin!r} has answers (try arithmetic,facts)")
        return items
    raise SpeechLMError("no texts: give --texts FILE or --builtin SOURCES (see --help)")


def _add_text_args(p: argparse.ArgumentParser) -> None:
    from .training.textgen import SOURCES, SPLITS

    p.add_argument("--texts", help="text file (one utterance per line) or .jsonl with a 'text' field per line")
    p.add_argument("--builtin", metavar="SOURCES", help=f"comma-separated built-in sources: {', '.join(SOURCES)}")
    p.add_argument("--count", type=_positive_int, default=100, help="items per built-in source (default 100)")
    p.add_argument("--split", choices=SPLITS, default="train", help="split of built-in texts (default train)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--answers",
        action="store_true",
        help="built-in QA sources: use each item's answer as the text, deduplicated (the assistant's spoken answers)",
    )


def cmd_data_texts(args: argparse.Namespace) -> int:
    from .training.textgen import write_jsonl

    items = _load_items(args)
    write_jsonl(items, args.out)
    print(f"wrote {len(items)} texts to {args.out}")
    return 0


def cmd_data_lexicon(args: argparse.Namespace) -> int:
    from .transcript_check import build_lexicon

    items = _load_items(args)
    lexicon = build_lexicon((item["text"] for item in items), voice=args.voice)
    lexicon.save(args.out)
    print(f"wrote {len(lexicon)} words of {len(items)} texts to {args.out}")
    return 0


def cmd_data_voices(args: argparse.Namespace) -> int:
    from .training.textgen import voice_catalog

    voices = voice_catalog(args.split, tuple(args.backends.split(",")))
    print(",".join(voices) if args.comma else "\n".join(voices))
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from .training.synth import SynthConfig, synthesize_corpus
    from .training.teachers import parse_voices

    voices = parse_voices(args.voices)
    items = _load_items(args)
    config = SynthConfig(voices=voices, seed=args.seed, voices_per_text=args.voices_per_text, shard_size=args.shard_size)
    summary = synthesize_corpus(items, args.out, config, workers=args.workers, progress=not args.quiet)
    print(
        f"{summary.utterances} utterances ({summary.failed} failed), {summary.hours:.4f} h of audio "
        f"in {summary.wall_seconds:.1f} s ({summary.hours_per_minute:.3f} h/min"
        + (f"; {summary.shards_done_before} shards already done" if summary.shards_done_before else "")
        + f") -> {Path(args.out) / 'manifest.jsonl'}"
    )
    return 0


def cmd_data_import(args: argparse.Namespace) -> int:
    from .training.recordings import ImportConfig, import_recordings, recording_items

    items = recording_items(args.source, args.path_column, args.text_column, args.speaker_column)
    config = ImportConfig(checker=args.checker, shard_size=args.shard_size, max_seconds=args.max_seconds, max_score=args.max_score)
    summary = import_recordings(items, args.out, config, workers=args.workers, progress=not args.quiet)
    print(f"{summary.utterances} recordings aligned ({summary.failed} failed: {Path(args.out) / 'failed.jsonl'}), {summary.hours:.4f} h "
          f"in {summary.wall_seconds:.1f} s" + (f"; {summary.shards_done_before} shards already done" if summary.shards_done_before else "")
          + f" -> {Path(args.out) / 'manifest.jsonl'}")
    return 0


def cmd_data_dialogues(args: argparse.Namespace) -> int:
    from .training.dialogues import DialogueConfig, synthesize_dialogues
    from .training.teachers import parse_voices

    items = _load_items(args)
    config = DialogueConfig(
        user_voices=parse_voices(args.user_voices),
        assistant_voices=parse_voices(args.assistant_voices),
        seed=args.seed,
        shard_size=args.shard_size,
        **{k: v for k, v in (("response_gap_range", args.response_gap), ("reaction_time", args.reaction_time), ("p_interrupt", args.p_interrupt),
                                  ("interrupt_window", args.interrupt_window), ("interrupt_anywhere", args.interrupt_anywhere),
                                  ("p_user_backchannel", args.user_backchannel), ("user_backchannel_window", args.user_backchannel_window)) if v is not None},
    )
    summary = synthesize_dialogues(items, args.out, config, workers=args.workers, progress=not args.quiet)
    print(f"{summary.utterances} dialogues ({summary.failed} failed), {summary.hours:.4f} h in {summary.wall_seconds:.1f} s -> {Path(args.out) / 'manifest.jsonl'}")
    return 0


def cmd_data_tokenize(args: argparse.Namespace) -> int:
    from .training.tokenize import tokenize_corpus

    codec = _load_codec(args.codec)
    s = tokenize_corpus(args.corpus, args.out, codec, args.codec, chunk_size=args.chunk_size, batch_size=args.batch_size, progress=not args.quiet)
    print(f"{s.utterances} utterances, {s.frames} frames ({s.frames / codec.config.frame_rate / 3600:.3f} h)"
          + (f"; {s.chunks_done_before} chunks already done" if s.chunks_done_before else "") + f" -> {Path(args.out) / 'index.jsonl'}")
    return 0


def cmd_data_perturb(args: argparse.Namespace) -> int:
    from .training.perturb import perturb_corpus

    s = perturb_corpus(args.corpus, args.out, speeds=args.speed, min_change=args.min_change, count=args.count, seed=args.seed)
    print(f"{s.rows} perturbed utterances ({s.seconds / 3600:.2f} h; {s.skipped} source rows not used) -> {Path(args.out) / 'manifest.jsonl'}")
    return 0


def cmd_data_rooms(args: argparse.Namespace) -> int:
    from .training.rooms import RoomConfig, room_corpus

    noises = tuple(n.strip() for n in args.noises.split(",") if n.strip())
    config = RoomConfig(lead=args.lead, lead_share=args.lead_share, tail=args.tail, noise_share=args.noise_share,
                        snr_db=args.snr_db, noises=noises)
    s = room_corpus(args.corpus, args.out, config=config, count=args.count, seed=args.seed)
    print(f"{s.rows} utterances in a room ({s.seconds / 3600:.2f} h; {s.skipped} source rows not used) -> {Path(args.out) / 'manifest.jsonl'}")
    return 0


# --- speech LM: tts / asr / chat ------------------------------------------------------------

DEFAULT_MODEL = "speechlm-default"


def _quiet_transformers() -> None:
    """No transformers warnings or "Loading weights" bars on a command line."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _load_pipeline(args: argparse.Namespace):
    import torch

    from .speech import SpeechPipeline, resolve_dtype

    _quiet_transformers()
    torch.set_num_threads(max(1, args.threads))
    dtype = resolve_dtype(args.dtype)
    return SpeechPipeline.from_pretrained(args.model, codec=args.codec, dtype=dtype)


def _voice(args: argparse.Namespace) -> str:
    from .speech import Generation

    voice = getattr(args, "voice", None) or Generation.voice
    if voice != Generation.voice and getattr(args, "no_adapter", False):
        raise SpeechLMError("--voice speaks through the voice's adapter: it does not go with --no-adapter")
    return voice


NO_SPEECH_WHY = "(silence, or sound the speech detector does not take for speech)"


def _detector(name: str | None) -> str | None:
    """--speech-detector NAME|none -> Generation.speech_detector."""
    from .speech import Generation

    return None if name == "none" else name or Generation.speech_detector


def _generation(args: argparse.Namespace):
    from .lm.generate import parse_codebook_temperatures
    from .speech import Generation

    return Generation(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed, max_seconds=args.max_seconds,
        codebook_temperatures=parse_codebook_temperatures(args.codebook_temperatures), transcribe_first=not getattr(args, "direct", False),
        asr_decoder=getattr(args, "asr_decoder", None) or Generation.asr_decoder,
        asr_views=getattr(args, "views", None) or Generation.asr_views,
        asr_edges=not getattr(args, "keep_edges", False),
        speech_detector=_detector(getattr(args, "speech_detector", None)),
        asr_check_rounds=Generation.asr_check_rounds if getattr(args, "check_rounds", None) is None else args.check_rounds,
        asr_pause_seconds=Generation.asr_pause_seconds if getattr(args, "pause_seconds", None) is None else args.pause_seconds,
        asr_short_pause_seconds=Generation.asr_short_pause_seconds if getattr(args, "short_pause_seconds", None) is None
        else args.short_pause_seconds,
        asr_adapter=None if getattr(args, "no_adapter", False) else Generation.asr_adapter,
        tts_adapter=None if getattr(args, "no_adapter", False) else Generation.tts_adapter,
        voice=_voice(args),
        reply_speech=getattr(args, "reply_speech", None) or Generation.reply_speech,
        guidance=Generation.guidance if getattr(args, "guidance", None) is None else args.guidance,
        candidates=getattr(args, "candidates", None) or Generation.candidates,
        checker=getattr(args, "checker", None) or Generation.checker,
        candidate_margin=Generation.candidate_margin if getattr(args, "candidate_margin", None) is None else args.candidate_margin,
        sentence_pause_seconds=Generation.sentence_pause_seconds if getattr(args, "sentence_pause", None) is None else args.sentence_pause,
        tts_max_words=Generation.tts_max_words if getattr(args, "max_words", None) is None else args.max_words,
    )


def cmd_tts(args: argparse.Namespace) -> int:
    import time

    if args.list_voices:
        return _list_voices(_load_pipeline(args))
    if (args.text is None) == (args.lines is None):
        raise SpeechLMError("give the text to speak or --lines FILE (one of them)")
    if args.output is None:
        raise SpeechLMError("give the output: -o OUT.wav (with --lines: a directory)")
    if args.lines is not None:
        if args.words:
            raise SpeechLMError("--words goes with one text, not --lines")
        return _tts_lines(args)
    from .codec.audio import audio_format, open_audio_writer

    out, raw = Path(args.output), args.output == "-"
    if not raw:
        audio_format(out)  # an unknown suffix: its one-line error before the model loads
    pipeline = _load_pipeline(args)
    g = _generation(args)
    pipeline.tts_adapter(g)  # an unknown --voice: its one-line error now, before any work
    if g.candidates > 1 and args.stream:
        raise SpeechLMError("--stream and --candidates > 1 do not go together: choosing needs each whole rendering")
    start = time.perf_counter()
    first, samples = None, 0

    def chunks():  # lazy: the output is opened (or fails to) before any speech is made
        if g.candidates == 1:
            yield from pipeline.tts(args.text, stream=True, generation=g)
        else:
            yield pipeline.tts(args.text, generation=g)

    report = sys.stderr if raw else sys.stdout
    sink = _StdoutPCM() if raw else open_audio_writer(out, pipeline.sample_rate)
    spoken = []  # (--words) the speech, to align the text to
    try:
        with sink as f:
            for chunk in chunks():
                first = first if first is not None else time.perf_counter() - start
                f.write(chunk)
                samples += len(chunk)
                if args.words:
                    spoken.append(chunk)
                if args.stream:
                    f.flush()
    except BrokenPipeError:  # the player reading stdout went away: nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error flushing the closed pipe at exit
        return 0
    except BaseException:  # bad text (empty, too long), Ctrl-C: no empty file left behind
        if not raw and not samples:
            out.unlink(missing_ok=True)
        raise
    seconds = samples / pipeline.sample_rate
    wall = time.perf_counter() - start
    where = "stdout (PCM16, 16 kHz, mono)" if raw else out
    if not samples:
        print(f"the model produced no speech for this text -> {where} (empty)", file=report)
        return 0
    msg = f"{seconds:.2f} s of speech -> {where} (real-time factor {wall / seconds:.2f}"
    print(msg + (f", first audio after {first * 1000:.0f} ms)" if first is not None else ")"), file=report)
    if args.words:
        import numpy as np

        words = pipeline.tts_words(np.concatenate(spoken), args.text, generation=g)
        print("".join(f"{w.start:.3f}\t{w.end:.3f}\t{w.word}\n" for w in words), end="", file=report, flush=True)
    return 0


class _StdoutPCM:
    """``speechlm tts -o -``: the speech as headerless PCM16 (little-endian) on stdout, for a player reading a pipe."""

    def __enter__(self) -> _StdoutPCM:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.flush()

    def write(self, chunk) -> None:
        from .codec.audio import to_pcm16

        sys.stdout.buffer.write(to_pcm16(chunk))

    def flush(self) -> None:
        sys.stdout.buffer.flush()


def _tts_lines(args: argparse.Namespace) -> int:
    """``speechlm tts --lines FILE -o DIR``: each non-empty line spoken into DIR/NNNNN.wav (NNNNN = its
    line number), ``--batch-size`` lines decoded as rows of one batch, the lines taken shortest first
    (a batch runs as long as its longest row: 48 held-out sentences in batches of 8 took 12 % less time
    so); a line that cannot be spoken is reported on stderr and the others go on (exit status 1 if any failed)."""
    from .codec.audio import WRITE_FORMATS, save_audio

    if args.stream:
        raise SpeechLMError("--stream speaks one text; --lines writes whole files")
    source = sys.stdin if args.lines == "-" else _open_text(args.lines)
    try:
        lines = sorted(((n, line.strip()) for n, line in enumerate(source, 1) if line.strip()), key=lambda item: (len(item[1]), item[0]))
    except UnicodeDecodeError:
        raise SpeechLMError(f"cannot read {args.lines}: not UTF-8 text") from None
    out = Path(args.output)
    if out.suffix.lower() in WRITE_FORMATS:
        raise SpeechLMError(f"with --lines the output is a directory, got {out}")
    out.mkdir(parents=True, exist_ok=True)
    pipeline, g = _load_pipeline(args), _generation(args)
    pipeline.tts_adapter(g)
    failed = 0
    for start in range(0, len(lines), args.batch_size):
        batch = lines[start : start + args.batch_size]
        try:
            audios = pipeline.tts_batch([text for _, text in batch], g) if g.candidates == 1 else None
        except SpeechLMError:
            audios = None  # some line of this batch cannot be spoken: each on its own, to say which
        for k, (n, text) in enumerate(batch):
            path = out / f"{n:05d}.wav"
            try:
                audio = audios[k] if audios is not None else pipeline.tts(text, generation=g)
            except SpeechLMError as e:
                print(f"speechlm: error: line {n}: {e}", file=sys.stderr)
                failed += 1
                continue
            save_audio(path, audio, pipeline.sample_rate)
            print(f"{path}\t{text}", flush=True)
    return 1 if failed else 0


def _open_text(path: str):
    try:
        return open(path, encoding="utf-8")
    except OSError as e:
        raise SpeechLMError(f"cannot read {path}: {e.strerror or e}") from None


def cmd_asr(args: argparse.Namespace) -> int:
    from .codec.audio import load_audio

    if args.subtitles and args.json:
        raise SpeechLMError("--subtitles and --json do not go together: pick one")
    if args.words and args.subtitles:
        raise SpeechLMError("--words and --subtitles do not go together: pick one")
    if args.subtitles and len(args.inputs) > 1 and args.output_dir is None:
        raise SpeechLMError("subtitles of several files need --output-dir DIR (each written there as NAME.srt or NAME.vtt)")
    pipeline = _load_pipeline(args)
    if args.int8:
        if not pipeline.lm.int8_computes:
            raise SpeechLMError("--int8 needs the LM computed in bfloat16 on a CPU (--dtype bfloat16, or auto where the CPU has it)")
        pipeline.lm.use_int8(4)
    g = _generation(args)
    if len(args.inputs) == 1:  # one file: its errors are the command's; a progress bar over a long recording's pieces
        audio = load_audio(args.inputs[0], sample_rate=pipeline.sample_rate)
        segments = pipeline.asr_segments(audio, generation=g, progress=sys.stderr.isatty())
        if not segments:
            print(f"no speech heard in {args.inputs[0]} {NO_SPEECH_WHY}", file=sys.stderr)
        words = pipeline.asr_words(audio, segments, generation=g) if args.words else None
        _print_transcript(args, args.inputs[0], audio, segments, pipeline.sample_rate, words)
        return 0
    failed = 0
    for k in range(0, len(args.inputs), args.batch_size):
        loaded = []
        for path in args.inputs[k : k + args.batch_size]:
            try:
                loaded.append((path, load_audio(path, sample_rate=pipeline.sample_rate)))
            except SpeechLMError as e:
                print(f"speechlm: error: {path}: {e}", file=sys.stderr)  # the other files go on
                failed += 1
        try:
            heard = pipeline.asr_segments_many([audio for _, audio in loaded], generation=g)
        except SpeechLMError:  # a file the batch cannot take: one by one, so that only it fails
            heard = [None] * len(loaded)
        for (path, audio), segments in zip(loaded, heard):
            try:
                segments = pipeline.asr_segments(audio, generation=g) if segments is None else segments
                words = pipeline.asr_words(audio, segments, generation=g) if args.words else None
            except SpeechLMError as e:
                print(f"speechlm: error: {path}: {e}", file=sys.stderr)
                failed += 1
                continue
            _print_transcript(args, path, audio, segments, pipeline.sample_rate, words)
    return 1 if failed else 0


def _print_transcript(args: argparse.Namespace, path: str, audio, segments: list, sample_rate: int, words: list | None = None) -> None:
    """``speechlm asr``'s output for one file: its transcript (several files: ``FILE<TAB>TEXT``), or with ``--json`` an object;
    ``words`` (``--words``): a line ``START<TAB>END<TAB>WORD`` each (several files: ``FILE<TAB>`` first), or ``words`` in the object."""
    import dataclasses
    import json

    text = " ".join(s.text for s in segments if s.text)
    if args.subtitles:
        from .subtitles import to_subtitles

        subtitles = to_subtitles(segments, args.subtitles)
        if args.output_dir is None:
            print(subtitles, end="", flush=True)
        else:
            target = Path(args.output_dir) / f"{Path(path).stem}.{args.subtitles}"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(subtitles, encoding="utf-8")
            print(f"{path}\t{target}", flush=True)
    elif args.json:
        print(json.dumps({"file": path, "text": text, "duration": round(len(audio) / sample_rate, 3),
                          "segments": [dataclasses.asdict(s) for s in segments],
                          **({"words": [dataclasses.asdict(w) for w in words]} if words is not None else {})}), flush=True)  # fmt: skip
    elif words is not None:
        prefix = "" if len(args.inputs) == 1 else f"{path}\t"
        print("".join(f"{prefix}{w.start:.3f}\t{w.end:.3f}\t{w.word}\n" for w in words), end="", flush=True)
    else:
        print(text if len(args.inputs) == 1 else f"{path}\t{' '.join(text.split())}", flush=True)  # one line per file


def cmd_chat(args: argparse.Namespace) -> int:
    from .codec.audio import load_audio, save_audio

    if args.text is not None:  # the arguments checked before the model loads
        if args.input is not None:
            raise SpeechLMError("give a spoken question or --text, not both")
        if not args.text.strip():
            raise SpeechLMError("empty question: --text needs some words")
    elif not args.list_voices and (args.input is None or args.output is None):
        raise SpeechLMError("give the spoken question and the output: speechlm chat IN.wav -o REPLY.wav (or --text QUESTION)")
    pipeline = _load_pipeline(args)
    if args.list_voices:
        return _list_voices(pipeline)
    g = _generation(args)
    pipeline.tts_adapter(g)
    if args.text is not None and args.output is None:  # a typed question, no speech wanted: the reply's text alone
        print(pipeline.reply_text(args.text, g))
        return 0
    question = args.text if args.text is not None else load_audio(args.input, sample_rate=pipeline.sample_rate)
    text, reply = pipeline.chat(question, generation=g)
    save_audio(args.output, reply, pipeline.sample_rate)
    if not text and args.text is None:
        print(f"no reply: no speech heard in {args.input} {NO_SPEECH_WHY}", file=sys.stderr)
    print(text)
    return 0


def _list_voices(pipeline) -> int:
    for name, about in pipeline.voices().items():
        print(f"{name}\t{about}")
    return 0


def _add_voice_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--voice", default=None,
                   help="speak in this voice of the model (its voice adapter voice-NAME; default: the model's own; see --list-voices)")
    p.add_argument("--list-voices", action="store_true", help="print the model's voices (NAME<TAB>what it was trained on) and exit")


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"speech LM directory or shipped name (default {DEFAULT_MODEL})")
    p.add_argument("--codec", help="codec directory or name (default: the one saved with the model)")
    p.add_argument("--temperature", type=float, default=0.0, help="speech sampling temperature (0 = greedy, the default)")
    p.add_argument("--top-k", type=int, default=50, help="speech sampling top-k (with --temperature > 0)")
    p.add_argument("--top-p", type=float, default=0.95, help="speech sampling top-p (with --temperature > 0)")
    p.add_argument("--codebook-temperatures", help="speech: one temperature per codebook, comma-separated (overrides --temperature)")
    p.add_argument("--guidance", type=float, default=None,
                   help="speech: classifier-free guidance on the text, 0 = off (default: the Generation default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-seconds", type=float, default=30.0, help="longest speech reply")
    p.add_argument("--threads", type=_positive_int, default=2, help="torch CPU threads")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="the LM's compute dtype: auto = bfloat16 where the CPU computes it natively (faster), else float32")
    p.add_argument("--no-adapter", action="store_true",
                   help="the base model alone (default: ASR hears through the model's asr task adapter and TTS speaks "
                        "through its tts adapter, when it has them)")


def _add_candidate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--candidates", type=_positive_int, default=None,
                   help="speech: speak it N times and keep the rendering the pronunciation checker hears clearest "
                        "(not streamed; needs espeak-ng; default: the Generation default, 1)")
    p.add_argument("--checker", default=None, help="pronunciation checker directory or shipped name (with --candidates)")
    p.add_argument("--candidate-margin", type=float, default=None,
                   help="keep the first rendering unless another scores lower by more than this (nats per phoneme; default 0.1)")


# --- codec --------------------------------------------------------------------------------

DEFAULT_CODEC = "codec-16k"


def _load_codec(name: str):
    import torch

    from .codec.model import Codec

    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    return Codec.from_pretrained(name).eval()


def _levels(codec, kbps: float | None) -> int | None:
    """``--bandwidth KBPS`` -> the codec's residual levels per group (None: all)."""
    return None if kbps is None else codec.config.levels_for(kbps)


def cmd_codec_encode(args: argparse.Namespace) -> int:
    from .codec.compress import encode_file

    codec = _load_codec(args.model)
    levels = _levels(codec, args.bandwidth)
    codes = encode_file(codec, args.input, args.output, levels)
    rate = codec.config.bitrate_at(levels or codec.config.num_quantizers)
    in_file = ""
    if Path(args.output).suffix == ".slc":  # entropy-coded: what the file really spends
        seconds = max(codes.num_samples, 1) / codec.sample_rate
        in_file = f"; {8 * Path(args.output).stat().st_size / seconds:.0f} bit/s in the file"
    print(f"{args.input}: {codes.codes.shape[0]} frames x {codes.codes.shape[1]} codes ({rate:.0f} bit/s{in_file}) -> {args.output}")
    return 0


def cmd_codec_fit_prior(args: argparse.Namespace) -> int:
    import numpy as np

    from .codec.audio import load_audio
    from .codec.compress import encode_audio
    from .codec.entropy import CodePrior
    from .training.audio_data import list_source_files

    codec = _load_codec(args.model)
    out = Path(args.out) if args.out else Path(args.model)
    if not args.out and not (out / "config.json").is_file():
        raise SpeechLMError("--out is needed: --model is a shipped name, not a codec directory")
    files = [f for spec in args.data for f in list_source_files(spec)[0]][: args.limit]
    c = codec.config

    def codes():
        from tqdm import tqdm

        for f in tqdm(files, desc="fit-prior", disable=args.quiet, file=sys.stderr):
            try:
                audio = load_audio(f, sample_rate=codec.sample_rate)
            except SpeechLMError as e:
                print(f"skipped: {e}", file=sys.stderr)
                continue
            if len(audio):
                yield encode_audio(codec, audio).codes

    prior = CodePrior.fit(codes(), codec.codec_id, c.groups, c.codes_per_frame, c.codebook_size)
    out.mkdir(parents=True, exist_ok=True)
    path = prior.save(out)
    bits = prior.bits_per_code()
    frames = int(prior.counts[0].sum())
    print(f"{len(files)} files, {frames} frames: {np.mean(bits):.2f} bits a code of {np.log2(c.codebook_size):.0f} "
          f"(~{np.sum(bits) * c.frame_rate:.0f} bit/s instead of {c.bitrate_at(c.num_quantizers):.0f}) -> {path}")
    return 0


def cmd_codec_decode(args: argparse.Namespace) -> int:
    from .codec.compress import decode_file

    decode_file(_load_codec(args.model), args.input, args.output)
    print(f"{args.input} -> {args.output}")
    return 0


def cmd_codec_roundtrip(args: argparse.Namespace) -> int:
    from .codec.compress import roundtrip_file

    codec = _load_codec(args.model)
    roundtrip_file(codec, args.input, args.output, _levels(codec, args.bandwidth))
    print(f"{args.input} -> {args.output}")
    return 0


def cmd_codec_eval(args: argparse.Namespace) -> int:
    import json

    import numpy as np

    from .codec.audio import WRITE_FORMATS, load_audio
    from .codec.compress import decode_codes, encode_audio
    from .codec.metrics import all_metrics

    folder = Path(args.input)
    if not folder.is_dir():
        raise SpeechLMError(f"not a directory: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in WRITE_FORMATS)[: args.limit]
    if not files:
        raise SpeechLMError(f"no audio files ({', '.join(WRITE_FORMATS)}) in {folder}")
    codec = _load_codec(args.model)
    levels = _levels(codec, args.bandwidth)
    rows, seconds, slc_bytes = [], 0.0, 0
    for f in files:
        audio = load_audio(f, sample_rate=codec.sample_rate)
        codes = encode_audio(codec, audio, levels)
        row = {"file": str(f)}
        if codec.code_prior is not None:  # what an entropy-coded .slc file of these codes spends
            row["slc_bytes"] = len(codes.to_slc(codec.code_prior))
            slc_bytes += row["slc_bytes"]
            seconds += len(audio) / codec.sample_rate
        rows.append({**row, **all_metrics(audio, decode_codes(codec, codes), codec.sample_rate)})
    summary = {"files": len(rows), "bitrate": codec.config.bitrate_at(levels or codec.config.num_quantizers), "codec_id": codec.codec_id}
    if seconds:
        summary["slc_bitrate"] = round(8 * slc_bytes / seconds)  # the .slc files' real rate (header included)
    for key in ("stoi", "pesq_wb", "si_sdr", "log_mel"):
        values = [r[key] for r in rows if r[key] is not None]
        summary[key] = round(float(np.mean(values)), 4) if values else None
    print(json.dumps(summary if not args.json else {"summary": summary, "files": rows}, indent=None if not args.json else 1))
    return 0


# --- training and plots --------------------------------------------------------------------


def cmd_train_codec(args: argparse.Namespace) -> int:
    import json

    from .training.codec_train import CodecTrainConfig, CodecTrainer

    overrides = {}
    if args.codec_config:
        try:
            text = args.codec_config
            overrides = json.loads(text) if text.lstrip().startswith("{") else json.loads(Path(text).read_text())
        except FileNotFoundError:
            raise SpeechLMError(f"--codec-config file not found: {args.codec_config}") from None
        except json.JSONDecodeError as e:
            raise SpeechLMError(f"--codec-config is neither a JSON file nor JSON: {e}") from None
    config = CodecTrainConfig(
        data=args.data, out=args.out, steps=args.steps, batch_size=args.batch_size, crop_seconds=args.crop_seconds, lr=args.lr,
        unquantized_steps=args.unquantized_steps, disc_start=args.disc_start, phase_weight=args.phase_weight,
        envelope_weight=args.envelope_weight, init_from=args.init_from,
        decoder_only=args.decoder_only, level_dropout=args.level_dropout, checkpoint_every=args.checkpoint_every,
        checkpoint_minutes=args.checkpoint_minutes, seed=args.seed, threads=args.threads, codec=overrides,
    )
    trainer = CodecTrainer(config)
    if trainer.rank == 0:
        print(f"data: {trainer.pool.describe()}; codec {trainer.codec.codec_id}, {trainer.codec.num_parameters() / 1e6:.2f} M parameters; starting at step {trainer.step}")
    trainer.train(progress=not args.quiet)
    if trainer.rank == 0:
        print(f"done: {trainer.step} steps; model in {Path(args.out) / 'model'}")
    return 0


def cmd_train_lm(args: argparse.Namespace) -> int:
    from .training.lm_train import train_lm_main

    return train_lm_main(args)


def cmd_train_checker(args: argparse.Namespace) -> int:
    from .training.checker_train import CheckerTrainConfig, CheckerTrainer

    config = CheckerTrainConfig(
        data=args.data, out=args.out, codec=None if args.codec == "none" else args.codec, voice_prefix=args.voice_prefix,
        codec_voice_prefix=args.codec_voice_prefix,
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, held_out=args.held_out, eval_every=args.eval_every,
        checkpoint_minutes=args.checkpoint_minutes, seed=args.seed, threads=args.threads, limit=args.limit,
    )
    trainer = CheckerTrainer(config)
    print(f"{len(trainer.train_clips)} training clips, {len(trainer.held_clips)} held out; "
          f"{len(trainer.model.config.phonemes)} symbols; starting at step {trainer.step}")
    trainer.train(progress=not args.quiet)
    print(f"done: {trainer.step} steps; model in {Path(args.out) / 'model'}")
    return 0


def cmd_train_vad(args: argparse.Namespace) -> int:
    from .training.vad_train import VadTrainConfig, VadTrainer

    config = VadTrainConfig(
        data=args.data, out=args.out, librispeech=args.librispeech, max_clips=args.limit, held_out=args.held_out,
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, eval_every=args.eval_every,
        checkpoint_minutes=args.checkpoint_minutes, seed=args.seed, threads=args.threads,
    )
    trainer = VadTrainer(config)
    print(f"{len(trainer.train_clips)} training clips, {len(trainer.held_clips)} held out; starting at step {trainer.step}")
    trainer.train(progress=not args.quiet)
    print(f"done: {trainer.step} steps; model in {Path(args.out) / 'model'}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .plotting import plot_log

    out = plot_log(args.log, args.output, args.keys.split(",") if args.keys else None)
    print(f"wrote {out}")
    return 0


# --- streaming ------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from .streaming.server import serve_main

    if args.model == "duplex":
        _quiet_transformers()
    return serve_main(args)


def cmd_client(args: argparse.Namespace) -> int:
    from .streaming.client import client_main

    return client_main(args)


# --- parser -------------------------------------------------------------------------------


def _add_asr_decoder_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--asr-decoder", choices=("lm", "ctc", "auto"), default=None,
                   help="lm: the LM writes the transcript; ctc: the hearing head in one forward (models with one); "
                        "auto: ctc when the model has a hearing head (default: the Generation default)")
    p.add_argument("--views", type=_positive_int, default=None,
                   help="the LM decoder listens to this many views of the audio (its level changed) and writes one transcript "
                        "from them; 1 = plain greedy decoding (default: the Generation default)")
    p.add_argument("--check-rounds", type=int, default=None, metavar="N",
                   help="check the LM's transcript against the sounds with the pronunciation checker: at most N one-word "
                        "edits (default: the Generation default, 3; 0 = off, faster)")
    p.add_argument("--pause-seconds", type=float, default=None, metavar="S",
                   help="hear a recording in pieces cut at its pauses of at least S seconds, each piece alone (the model "
                        "transcribes one sentence at a time; default: the Generation default, 0.25; 0 = one piece)")
    p.add_argument("--short-pause-seconds", type=float, default=None, metavar="S",
                   help="also hear a piece in two at its longest pause of at least S seconds, and keep what the pronunciation "
                        "checker hears better (default: the Generation default, 0.15; 0 = cut at the long pauses only)")
    p.add_argument("--keep-edges", action="store_true",
                   help="hear the audio's quiet start and end as they are (default: a long quiet start or end is cut short, "
                        "and the room's steady noise heard there suppressed under the speech)")
    p.add_argument("--speech-detector", metavar="NAME|none",
                   help="no transcript for audio (or a piece of a long recording) in which this speech detector hears no "
                        "speech: noise, tones, clicks (default: the shipped vad-en; 'none': only digital silence is nothing)")


def _add_small_training_arguments(p: argparse.ArgumentParser, *, held_out: int, held_out_help: str, limit_help: str) -> None:
    """The schedule and run options of ``speechlm train checker`` and ``train vad`` (speechlm.training.small_trainer)."""
    p.add_argument("--steps", type=_positive_int, default=3000)
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--held-out", type=int, default=held_out, help=held_out_help)
    p.add_argument("--eval-every", type=_positive_int, default=250)
    p.add_argument("--checkpoint-minutes", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=_positive_int, default=2)
    p.add_argument("--limit", type=_positive_int, help=limit_help)
    p.add_argument("--quiet", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="speechlm", description="Streaming interleaved speech-text language models.")
    parser.add_argument("--version", action="version", version=f"speechlm {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("tts", help="text -> speech")
    p.add_argument("text", nargs="?", help="the text (or --lines FILE)")
    p.add_argument("-o", "--output", help=".wav, .flac, .ogg, .opus or .mp3 (with --lines: a directory); '-': raw PCM16 (16 kHz, "
                                          "mono, little-endian) on stdout, e.g. --stream -o - | aplay -f S16_LE -r 16000")
    p.add_argument("--stream", action="store_true", help="write audio as frames decode (flushes per chunk)")
    p.add_argument("--lines", metavar="FILE",
                   help="speak every non-empty line of FILE ('-' = stdin) into OUTPUT/NNNNN.wav, --batch-size lines per batch; "
                        "prints 'FILE<TAB>TEXT' per line spoken")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="--lines: texts decoded together as rows of one batch (default 8)")
    p.add_argument("--sentence-pause", type=float, default=None, metavar="S",
                   help="a text of several sentences is spoken sentence by sentence, S seconds of silence between (default 0.3)")
    p.add_argument("--max-words", type=int, default=None, metavar="N",
                   help="a sentence longer than N spoken words is spoken clause by clause (default: the Generation default, 14; "
                        "0 = each sentence whole)")
    p.add_argument("--words", action="store_true",
                   help="after the speech, print a line 'START<TAB>END<TAB>WORD' a word: where each word was said (the text aligned "
                        "to the speech by the pronunciation checker; needs espeak-ng)")
    _add_voice_arguments(p)
    _add_model_arguments(p)
    _add_candidate_arguments(p)
    p.set_defaults(func=cmd_tts)

    p = sub.add_parser("asr", help="speech -> text (prints the transcript)")
    p.add_argument("inputs", nargs="+", metavar="input", help="audio file(s); with several, one 'FILE<TAB>TEXT' line each")
    p.add_argument("--json", action="store_true",
                   help="print a JSON object a file: text, duration, segments (start and end seconds, text: the pieces heard alone)")
    p.add_argument("--subtitles", choices=("srt", "vtt"),
                   help="print subtitles instead: SubRip or WebVTT cues of the pieces heard (with several files: --output-dir)")
    p.add_argument("--output-dir", metavar="DIR", help="--subtitles: write each file's as DIR/NAME.srt (or .vtt) instead of printing them")
    p.add_argument("--words", action="store_true",
                   help="word timestamps: a line 'START<TAB>END<TAB>WORD' a word (with --json: 'words' in the object), by forced alignment of "
                        "the transcript with the pronunciation checker (needs espeak-ng)")
    p.add_argument("--int8", action="store_true",
                   help="products of at most 4 rows read the backbone's weights as int8 (bfloat16 on a CPU: faster, rounded differently; "
                        "the same WER on 80 held-out-voice utterances)")
    p.add_argument("--batch-size", type=_positive_int, default=8, metavar="N",
                   help="several files: hear up to N at once, those heard in one piece as rows of one batch (1: one by one)")
    _add_asr_decoder_argument(p)
    _add_model_arguments(p)
    p.set_defaults(func=cmd_asr)

    p = sub.add_parser("chat", help="one spoken turn: prints the reply text, writes the reply speech")
    p.add_argument("input", nargs="?", help="the spoken question (audio file)")
    p.add_argument("--text", help="a typed question instead (without -o: print the reply's text only)")
    p.add_argument("-o", "--output", help="the reply's speech (.wav, .flac, .ogg, .opus or .mp3)")
    p.add_argument("--direct", action="store_true", help="answer the speech directly instead of transcribing it first")
    p.add_argument("--reply-speech", choices=("chat", "tts"), default=None,
                   help="speak the written reply in the chat turn (default) or by the TTS task")
    _add_asr_decoder_argument(p)
    _add_voice_arguments(p)
    _add_model_arguments(p)
    _add_candidate_arguments(p)
    p.set_defaults(func=cmd_chat)

    data = sub.add_parser("data", help="synthetic data: texts, speech, dialogues").add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    p = data.add_parser("texts", help="write built-in or user texts (with splits) to a .jsonl")
    _add_text_args(p)
    p.add_argument("-o", "--out", required=True, help="output .jsonl")
    p.set_defaults(func=cmd_data_texts)

    p = data.add_parser("lexicon", help="the words of some texts and their espeak-ng phonemes (.json), for ASR's transcript check")
    _add_text_args(p)
    p.add_argument("--voice", default="en-us", help="espeak-ng voice whose phonemes to write (the checker's; default en-us)")
    p.add_argument("-o", "--out", required=True, help="output .json (a checker's lexicon.json)")
    p.set_defaults(func=cmd_data_lexicon)

    p = data.add_parser("voices", help="list the voice catalogue (train voices, or held-out test voices)")
    p.add_argument("--split", choices=["train", "test"], help="only voices of this split")
    p.add_argument("--backends", default="espeak,piper", help="comma-separated: espeak,piper")
    p.add_argument("--comma", action="store_true", help="one comma-separated line (to pass to --voices)")
    p.set_defaults(func=cmd_data_voices)

    p = data.add_parser("synth", help="texts -> speech with word timestamps (resumable, parallel)")
    _add_text_args(p)
    p.add_argument("--voices", required=True, help="comma-separated voices, e.g. espeak:en-us,espeak:en-gb+f3,piper:joe")
    p.add_argument("--out", required=True, help="output directory (re-run to resume)")
    p.add_argument("--workers", type=_positive_int, default=1, help="worker processes (default 1)")
    p.add_argument("--voices-per-text", type=_positive_int, default=1, help="voices that speak each text (default 1)")
    p.add_argument("--shard-size", type=_positive_int, default=50, help="utterances per shard (default 50)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_data_synth)

    p = data.add_parser("import", help="recordings with transcripts -> a corpus with word timestamps (forced alignment; resumable)")
    p.add_argument("source", help="a table (.tsv, or .csv) of audio paths and transcripts with a header row, or a folder of audio files "
                                  "each with NAME.txt (or .lab) beside it")
    p.add_argument("--out", required=True, help="output directory (re-run to resume)")
    p.add_argument("--path-column", default="path", help="the table's column of audio paths, relative to the table (default path)")
    p.add_argument("--text-column", default="text", help="the table's column of transcripts (default text)")
    p.add_argument("--speaker-column", help="the table's column of speakers (voice import:SPEAKER; default: the table's name)")
    p.add_argument("--checker", default="checker-en", help="pronunciation checker that aligns (default checker-en)")
    p.add_argument("--max-seconds", type=_positive_float, default=60.0, help="longer recordings are failed (default 60)")
    p.add_argument("--max-score", type=_nonnegative_float, default=7.0,
                   help="fail alignments scoring above this, nats per phoneme over the checker's own reading: a transcript that does not "
                        "match its audio (default 7; the score is in each row)")
    p.add_argument("--workers", type=_positive_int, default=1, help="worker processes (default 1)")
    p.add_argument("--shard-size", type=_positive_int, default=50, help="recordings per shard (default 50)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_data_import)

    p = data.add_parser("dialogues", help="two-voice, two-channel dialogues with overlaps, interruptions and backchannels")
    _add_text_args(p)
    p.set_defaults(builtin=None)
    p.add_argument("--user-voices", default="espeak:en-us,espeak:en-gb+f3,espeak:en-us+m3", help="voices of speaker A (channel 0)")
    p.add_argument("--assistant-voices", default="piper:joe", help="voices of speaker B (channel 1)")
    p.add_argument("--out", required=True, help="output directory (re-run to resume)")
    p.add_argument("--workers", type=_positive_int, default=1, help="worker processes (default 1)")
    p.add_argument("--shard-size", type=_positive_int, default=20, help="dialogues per shard (default 20)")
    p.add_argument("--response-gap", type=_seconds_range, metavar="MIN,MAX",
                   help="seconds of silence before the assistant answers a user turn (default 0.08,0.35)")
    p.add_argument("--reaction-time", type=_nonnegative_float, help="seconds the assistant keeps talking once the user interrupts (default 0.12)")
    p.add_argument("--p-interrupt", type=_probability, help="chance that the user interrupts an assistant turn of >= 4 words (default 0.35)")
    p.add_argument("--interrupt-window", type=_share_range, metavar="MIN,MAX",
                   help="where in the assistant's turn the user may cut in, as shares of its words (default 0.5,1 = its second half; 0,1 = anywhere)")
    p.add_argument("--interrupt-anywhere", type=_probability, metavar="SHARE",
                   help="share of interruptions that cut in at any moment of that window, mid-word too, from 0.1 s into the turn, "
                        "instead of right after a word (default 0)")
    p.add_argument("--user-backchannel", type=_probability, metavar="P",
                   help="chance of a user backchannel ('mm-hm', 'yeah') over an assistant turn, which talks on through it (default 0)")
    p.add_argument("--user-backchannel-window", type=_seconds_range, metavar="MIN,MAX",
                   help="seconds into the assistant's speech where that backchannel may start (default 0.2,1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_data_dialogues)

    p = data.add_parser("tokenize", help="a synth or dialogue corpus -> codec tokens for LM training (resumable)")
    p.add_argument("corpus", help="directory with manifest.jsonl")
    p.add_argument("--out", required=True)
    p.add_argument("--codec", default=DEFAULT_CODEC, help=f"codec directory or shipped name (default {DEFAULT_CODEC})")
    p.add_argument("--chunk-size", type=_positive_int, default=500, help="utterances per codes file")
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_data_tokenize)

    p = data.add_parser("perturb", help="speed-perturbed copy of a synth corpus's training rows (more voices for listening)")
    p.add_argument("corpus", help="directory with manifest.jsonl")
    p.add_argument("--out", required=True)
    p.add_argument("--speed", type=_speed_range, default=(0.85, 1.15), metavar="MIN,MAX", help="speed factors drawn per utterance (default 0.85,1.15)")
    p.add_argument("--min-change", type=_nonnegative_float, default=0.03, help="least |factor - 1| (default 0.03)")
    p.add_argument("--count", type=_positive_int, help="perturb this many rows (a seeded sample; default all)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_data_perturb)

    p = data.add_parser("rooms", help="a copy of a synth corpus's training rows as a microphone in a room hears them (quiet edges, noise)")
    p.add_argument("corpus", help="directory with manifest.jsonl")
    p.add_argument("--out", required=True)
    p.add_argument("--lead", type=_seconds_range, default=(0.05, 1.0), metavar="MIN,MAX", help="seconds of quiet before the speech (default 0.05,1)")
    p.add_argument("--lead-share", type=_probability, default=0.8, help="share of rows with a quiet lead (default 0.8)")
    p.add_argument("--tail", type=_seconds_range, default=(0.0, 0.6), metavar="MIN,MAX", help="seconds of quiet after it (default 0,0.6)")
    p.add_argument("--noise-share", type=_probability, default=0.7, help="share of rows with a room's noise under them (default 0.7)")
    p.add_argument("--snr-db", type=_db_range, default=(5.0, 40.0), metavar="MIN,MAX", help="speech over noise, dB (default 5,40)")
    p.add_argument("--noises", default="white,pink,brown,hum", help="noise kinds to draw from (default white,pink,brown,hum; any of speechlm.training.noises: tone, buzz, clicks, modulated, band, music, sweep, ...)")
    p.add_argument("--count", type=_positive_int, help="augment this many rows (a seeded sample; default all)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_data_rooms)

    codec = sub.add_parser("codec", help="the GRVQ speech codec: encode, decode, roundtrip, eval").add_subparsers(dest="codec_command", metavar="SUBCOMMAND", required=True)
    model_help = f"codec directory or shipped name (default {DEFAULT_CODEC})"
    bandwidth_help = ("a lower bitrate: the first residual levels of each group only (codec-16k: 0.5, 1, 1.5 or 2 kbit/s; "
                      "default: all, 2)")
    for name, help_text, func in (
        ("encode", "audio file -> codes .npz, or .slc (entropy-coded with the codec's code prior: smaller)", cmd_codec_encode),
        ("decode", "codes .npz or .slc -> audio file", cmd_codec_decode),
        ("roundtrip", "audio -> codes -> audio", cmd_codec_roundtrip),
    ):
        p = codec.add_parser(name, help=help_text)
        p.add_argument("input")
        p.add_argument("-o", "--output", required=True)
        p.add_argument("--model", default=DEFAULT_CODEC, help=model_help)
        if name != "decode":  # (decoding reads the bitrate from the codes)
            p.add_argument("--bandwidth", type=float, metavar="KBPS", help=bandwidth_help)
        p.set_defaults(func=func)
    p = codec.add_parser("fit-prior", help="count how often each codebook uses each code, for entropy-coded .slc files")
    p.add_argument("--data", nargs="+", required=True, help="sources: manifest:DIR, librispeech:DIR[:train], dir:DIR (as train codec; weights ignored)")
    p.add_argument("--model", default=DEFAULT_CODEC, help=model_help)
    p.add_argument("--out", help="the codec directory to write code_prior.safetensors into (default: --model, when it is a directory)")
    p.add_argument("--limit", type=_positive_int, help="at most this many files")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_codec_fit_prior)
    p = codec.add_parser("eval", help="SI-SDR, log-mel distance (and STOI, PESQ-WB with the [eval] extra) over a folder")
    p.add_argument("input", help="folder of audio files")
    p.add_argument("--model", default=DEFAULT_CODEC, help=model_help)
    p.add_argument("--limit", type=_positive_int, default=1000, help="at most this many files")
    p.add_argument("--json", action="store_true", help="per-file results too")
    p.add_argument("--bandwidth", type=float, metavar="KBPS", help=bandwidth_help)
    p.set_defaults(func=cmd_codec_eval)

    train = sub.add_parser("train", help="training: codec, lm, checker, vad").add_subparsers(dest="train_command", metavar="SUBCOMMAND", required=True)
    p = train.add_parser("codec", help="train the GRVQ codec (resumes from OUT/checkpoint.pt; works under torchrun)")
    p.add_argument("--data", nargs="+", required=True, help="sources: manifest:DIR, librispeech:DIR[:train], dir:DIR, each with optional @WEIGHT")
    p.add_argument("--out", required=True, help="run directory (checkpoint.pt, log.jsonl, model/)")
    p.add_argument("--steps", type=_positive_int, default=20000)
    p.add_argument("--batch-size", type=_positive_int, default=16, help="global batch (split across torchrun processes)")
    p.add_argument("--crop-seconds", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--unquantized-steps", type=int, default=300, help="autoencoder warm-up before the VQ")
    p.add_argument("--disc-start", type=int, default=3000, help="step at which the adversarial losses start")
    p.add_argument("--phase-weight", type=float, default=1.0, help="weight of the APNet-style phase losses (0 = off)")
    p.add_argument("--envelope-weight", type=float, default=0.0,
                   help="weight of the band-envelope correlation loss, a differentiable STOI stand-in (0 = off)")
    p.add_argument("--checkpoint-every", type=_positive_int, default=500)
    p.add_argument("--checkpoint-minutes", type=float, default=5.0)
    p.add_argument("--codec-config", help="JSON (or a JSON file) of CodecConfig overrides")
    p.add_argument("--init-from", help="start from these codec weights (directory or shipped name), e.g. to continue codec-16k")
    p.add_argument("--decoder-only", action="store_true",
                   help="train only the decoder of --init-from: encoder and codebooks frozen, so its codes (and the LMs trained on them) stay valid")
    p.add_argument("--level-dropout", type=float, default=0.0, metavar="SHARE",
                   help="with --decoder-only: decode this share of each batch from the first residual levels only (a random "
                        "number of them), so that the decoder learns the lower bitrates (--bandwidth) too (default 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=_positive_int, default=1, help="torch threads per process")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_train_codec)

    from .training.lm_train_config import add_train_lm_arguments

    p = train.add_parser("lm", help="train the speech LM by stages: text, align, mctp1, mctp, sft (resumable; works under torchrun)")
    add_train_lm_arguments(p)
    p.set_defaults(func=cmd_train_lm)

    p = train.add_parser("checker", help="train the pronunciation checker that picks among TTS candidates (resumable)")
    p.add_argument("--data", nargs="+", required=True, help="synth corpus directories (manifest.jsonl) of the TTS teacher's voice")
    p.add_argument("--out", required=True, help="run directory (data/, checkpoint.pt, log.jsonl, model/)")
    p.add_argument("--codec", default=DEFAULT_CODEC, help="add each clip through this codec too ('none': plain clips only)")
    p.add_argument("--voice-prefix", default="espeak:en-us", help="use the records whose voice starts with this (comma-separated: any of them)")
    p.add_argument("--codec-voice-prefix", default="espeak:en-us",
                   help="add the codec's copy of the records whose voice starts with this (comma-separated: any of them)")
    _add_small_training_arguments(p, held_out=200, held_out_help="clips kept out for the phoneme error rate",
                                  limit_help="at most this many records per corpus")
    p.set_defaults(func=cmd_train_checker)

    p = train.add_parser("vad", help="train the speech detector that keeps noise from being transcribed (resumable)")
    p.add_argument("--data", nargs="+", required=True, help="synth corpus directories (manifest.jsonl): the speech")
    p.add_argument("--librispeech", help="a folder of LibriSpeech .flac files: real speech too (speakers below 7000)")
    p.add_argument("--out", required=True, help="run directory (checkpoint.pt, log.jsonl, model/)")
    _add_small_training_arguments(p, held_out=64, held_out_help="clips kept out for the held-out batch",
                                  limit_help="at most this many clips of each source")
    p.set_defaults(func=cmd_train_vad)

    from .streaming.client import add_client_arguments
    from .streaming.settings import add_serve_arguments

    p = sub.add_parser("serve", help="full-duplex websocket server (/ws) and browser page (/)")
    add_serve_arguments(p)
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("client", help="stream a file (or --mic) to a speechlm server; write the reply, print both transcripts")
    add_client_arguments(p)
    p.set_defaults(func=cmd_client)

    p = sub.add_parser("plot", help="plot a training log.jsonl to PNG")
    p.add_argument("log")
    p.add_argument("-o", "--output", required=True, help="PNG file")
    p.add_argument("--keys", help="comma-separated metrics (default: all)")
    p.set_defaults(func=cmd_plot)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (SpeechLMError, FileNotFoundError) as e:
        if args.debug:
            raise
        print(f"speechlm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("speechlm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the output's reader went away (`speechlm data voices | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (the interpreter's final flush would fail too)
        return 141


if __name__ == "__main__":
    sys.exit(main())
