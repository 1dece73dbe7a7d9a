"""Speech to text from Python.

    python examples/asr.py speechlm-default speech.wav
"""

import sys

from speechlm.codec.audio import load_audio
from speechlm.speech import SpeechPipeline

pipeline = SpeechPipeline.from_pretrained(sys.argv[1])
audio = load_audio(sys.argv[2], sample_rate=pipeline.sample_rate)  # any format, any rate -> 16 kHz mono
print(pipeline.asr(audio))
