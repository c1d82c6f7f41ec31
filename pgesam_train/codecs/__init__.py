"""Codec backends behind `pgesam_train.codec.Codec`, by name.

`BACKENDS["stft"]` (the default, ours), `BACKENDS["encodec"]` (the paper's EnCodec 24 kHz; imported only when asked
for, since it pulls in the `encodec` package), `BACKENDS["griffinlim"]` (the no-training floor).
"""
from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the registry itself stays torch-free, so CLIs can list backends without importing torch
    from ..codec import Codec

_WHERE = {
    "stft": ("pgesam_train.codecs.stft", "StftCodec"),
    "encodec": ("pgesam_train.codecs.encodec", "EncodecCodec"),
    "griffinlim": ("pgesam_train.codecs.griffinlim", "GriffinLimCodec"),
}


class _Backends(Mapping):
    """name -> Codec subclass, each module imported on first lookup."""

    def __getitem__(self, name: str) -> type["Codec"]:
        if name not in _WHERE:
            raise KeyError(name)
        module, cls = _WHERE[name]
        try:
            return getattr(importlib.import_module(module), cls)
        except ImportError as e:
            from ..codec import CodecError
            raise CodecError(f"codec backend {name!r} cannot be loaded ({e})") from e

    def __iter__(self) -> Iterator[str]:
        return iter(_WHERE)

    def __len__(self) -> int:
        return len(_WHERE)


BACKENDS: Mapping[str, type["Codec"]] = _Backends()

__all__ = ["BACKENDS"]
