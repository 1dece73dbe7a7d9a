"""Voice chat with a speechlm server: microphone in, speakers out, words printed as they come.

    speechlm serve                                   # in another terminal
    python examples/voice_client.py ws://127.0.0.1:8998

Needs ``pip install sounddevice`` (and PortAudio), and headphones: through speakers the model hears itself. ``speechlm
client URL --mic`` does the same and cleans the speakers' sound out of the microphone's (``pip install 'speechlm[mic]'``;
in your own client: ``speechlm.streaming.echo.EchoCanceller``, ``.played(block)`` in ``play``, ``.clean(block)`` in
``record``).
"""

import asyncio
import sys

import sounddevice as sd

from speechlm.streaming.client import DuplexClient, PlaybackBuffer
from speechlm.streaming.protocol import Audio, Text


async def chat(url: str) -> None:
    loop, mic, speaker = asyncio.get_running_loop(), asyncio.Queue(), PlaybackBuffer()

    def record(data, *_):  # sound card thread -> event loop
        loop.call_soon_threadsafe(mic.put_nowait, data[:, 0].copy())

    def play(out, frames, *_):  # sound card thread <- jitter buffer
        out[:, 0] = speaker.pull(frames)

    async with await DuplexClient.connect(url) as client:
        audio = dict(samplerate=client.sample_rate, blocksize=client.frame_length, channels=1, dtype="float32")
        with sd.InputStream(**audio, callback=record), sd.OutputStream(**audio, callback=play):

            async def send():
                while True:
                    await client.send_audio(await mic.get())

            sender = asyncio.create_task(send())
            async for message in client.messages():  # until the server closes or Ctrl-C
                if isinstance(message, Audio):
                    speaker.push(client.pcm(message))
                elif isinstance(message, Text):
                    print(f"{message.speaker}: {message.text}", flush=True)
            sender.cancel()


if __name__ == "__main__":
    asyncio.run(chat(sys.argv[1] if len(sys.argv) > 1 else "ws://127.0.0.1:8998"))
