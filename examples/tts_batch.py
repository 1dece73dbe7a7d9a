"""Several texts spoken as the rows of one batch (each row speaks what it would alone), then one text
spoken four ways and the rendering the pronunciation checker hears clearest kept, then texts streamed
at once, one of them joining while the others speak (as a server's replies do).

    python examples/tts_batch.py speechlm-default out/
"""

import sys
from pathlib import Path

import numpy as np

from speechlm.codec.audio import save_audio
from speechlm.speech import Generation, SpeechPipeline

model, out = sys.argv[1], Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
pipeline = SpeechPipeline.from_pretrained(model)
texts = ["Good morning.", "The meeting starts at nine.", "Please bring the report."]
for k, audio in enumerate(pipeline.tts_batch(texts)):  # float32 (T,) at 16 kHz each
    save_audio(out / f"{k}.wav", audio, pipeline.sample_rate)
best = pipeline.tts("It costs three dollars.", generation=Generation(candidates=4))  # 4 renderings, one batch
save_audio(out / "best.wav", best, pipeline.sample_rate)
streams = pipeline.speech_streams()  # streaming TTS of texts added at any time, rows of one running batch
keys = [streams.add(text) for text in texts[:2]]
frames = {}
while streams:
    for key, made in streams.step().items():  # 40 ms PCM frames of each text, in order, as they decode
        frames.setdefault(key, []).extend(made)
    if len(keys) < len(texts):
        keys.append(streams.add(texts[len(keys)]))  # joins at the batch's next step
for k, key in enumerate(keys):
    save_audio(out / f"stream{k}.wav", np.concatenate(frames[key]), pipeline.sample_rate)
print(f"{2 * len(texts) + 1} files -> {out}")
