"""The daemon: ZeroMQ intake and control endpoints on asyncio, the engine on its own thread."""
