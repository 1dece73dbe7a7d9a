"""Text to speech from Python, streaming: PCM chunks arrive as the model's frames decode.

    python examples/tts.py speechlm-default "Hello there, how are you?" out.wav [VOICE]

VOICE: one of the model's voices (``SpeechPipeline.voices()``; default: its own).
"""

import sys

import numpy as np

from speechlm.codec.audio import save_audio
from speechlm.speech import Generation, SpeechPipeline

model, text, out = sys.argv[1], sys.argv[2], sys.argv[3]
pipeline = SpeechPipeline.from_pretrained(model)
generation = Generation(voice=sys.argv[4] if len(sys.argv) > 4 else "default")
print("voices:", ", ".join(pipeline.voices()))
chunks = []
for chunk in pipeline.tts(text, stream=True, generation=generation):  # float32 PCM at 16 kHz, 40 ms per chunk
    chunks.append(chunk)  # a real-time app would play it here
save_audio(out, np.concatenate(chunks), pipeline.sample_rate)
print(f"{len(chunks) * 0.04:.2f} s -> {out}")
