"""The engine's refusals: each message goes back to the client (/pgesam/error, the web page's reply)."""
from __future__ import annotations


class EngineError(ValueError):
    """A request the engine refuses (out of range, missing file); the message is sent back as /pgesam/error."""


class EngineBusy(EngineError):
    """A note dropped because a bound was reached (event queue full, too many notes generating at once)."""
