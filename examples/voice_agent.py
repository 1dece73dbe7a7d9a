"""A voice agent with a brain of your own: the server hears the question and says the reply; you write the reply.

    speechlm serve                                   # in another terminal (its answer assist hears and speaks)
    python examples/voice_agent.py ws://127.0.0.1:8998 question.wav reply.wav

The session asks for ``replies: client``: the server transcribes each question and sends it as the user's TEXT
when its duplex model takes the turn; ``reply`` (any function: call your own LLM there) writes the answer, and the
server says it in its voice, stopping if the user talks over it. ``says`` (``DuplexClient.say``) speak at any time.
"""

import asyncio
import sys

from speechlm.codec.audio import load_audio, save_audio
from speechlm.streaming.client import stream_file


def reply(question: str) -> str:
    return "Two plus three is five." if "plus" in question.lower() else f"You asked: {question}"  # your LLM here


def main(url: str, question: str, out: str) -> None:
    talk = stream_file(url, load_audio(question, 16_000), says=["Hello!"], reply=reply, listen_seconds=6)
    conversation = asyncio.run(talk)
    print("user: ", conversation.transcript("user"), "\nmodel:", conversation.transcript("model"))
    save_audio(out, conversation.audio, conversation.sample_rate)


if __name__ == "__main__":
    main(*sys.argv[1:4])
