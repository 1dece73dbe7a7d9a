"""One spoken turn from Python: a spoken question in, the reply's text and speech out.

    python examples/chat.py speechlm-default question.wav reply.wav
"""

import sys

from speechlm.codec.audio import load_audio, save_audio
from speechlm.speech import Generation, SpeechPipeline

pipeline = SpeechPipeline.from_pretrained(sys.argv[1])
question = load_audio(sys.argv[2], sample_rate=pipeline.sample_rate)
text, speech = pipeline.chat(question, generation=Generation(max_seconds=10.0))
save_audio(sys.argv[3], speech, pipeline.sample_rate)
print(text)
