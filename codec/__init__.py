"""speechlm.codec: causal GRVQ neural audio codec, audio I/O (depends on nothing else of ours)."""
