"""Several texts spoken as the rows of one batch (each row speaks what it would alone), then one text
spoken four ways and the rendering the pronunciation checker hears clearest kept.

    python examples/tts_batch.py speechlm-default out/
"""

import sys
from pathlib import Path

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
print(f"{len(texts) + 1} files -> {out}")
