"""speechlm.streaming: full-duplex websocket server, scheduler, protocol and clients."""
