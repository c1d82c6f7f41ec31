"""The free General-MIDI soundfonts we render from, and the GM program -> NSynth family/source map.

Soundfonts of one origin are near-duplicates (MuseScore_General and FluidR3Mono derive from FluidR3): the split
keeps every instrument of one (origin, program) group in the same split, so the test set never hears a copy of a
training instrument. Licences are those of the Debian packages' copyright files.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Soundfont:
    name: str  # short id used in configs and instrument names
    debian_package: str
    paths: tuple[str, ...]  # candidate locations, first existing wins
    origin: str  # soundfonts sharing an origin are treated as near-duplicates
    licence: str

    def locate(self) -> Path:
        for p in self.paths:
            if Path(p).is_file():
                return Path(p)
        raise FileNotFoundError(f"soundfont {self.name!r} not found (looked in {', '.join(self.paths)}); "
                                f"install it with: apt-get install {self.debian_package}")


SOUNDFONTS: dict[str, Soundfont] = {s.name: s for s in (
    Soundfont("fluidr3", "fluid-soundfont-gm", ("/usr/share/sounds/sf2/FluidR3_GM.sf2",), "fluidr3", "MIT"),
    Soundfont("musescore", "musescore-general-soundfont",
              ("/usr/share/sounds/sf3/MuseScore_General_Full.sf3", "/usr/share/sounds/sf3/MuseScore_General.sf3"),
              "fluidr3", "MIT"),
    Soundfont("fluidr3mono", "fluidr3mono-gm-soundfont",
              ("/usr/share/sounds/sf3/FluidR3Mono_GM.sf3", "/usr/share/fluidr3mono-gm-soundfont/FluidR3Mono_GM.sf3"),
              "fluidr3", "MIT"),
    Soundfont("timgm6mb", "timgm6mb-soundfont", ("/usr/share/sounds/sf2/TimGM6mb.sf2",), "timgm6mb", "GPL-2"),
    Soundfont("sf_gmbank", "csound-soundfont",
              ("/usr/share/sounds/sf2/sf_GMbank.sf2", "/usr/share/samples/sf_GMbank.sf2"), "sf_gmbank", "LGPL-2.1+"),
    Soundfont("opl3", "opl3-soundfont", ("/usr/share/sounds/sf2/OPL-3_FM_128M.sf2",), "opl3", "CC-BY-SA-4.0"),
)}

DEBIAN_PACKAGES = tuple(sorted({s.debian_package for s in SOUNDFONTS.values()}))

# General MIDI program (0-based) -> NSynth family. Drums, effects, pads and unpitched programs are absent:
# 47 timpani, 55 orchestra hit, 88-90 and 92-103 pads/FX, 113 and 115-127 percussion and sound effects.
_FAMILY_RANGES = {
    "keyboard": [range(0, 8)],
    "mallet": [range(8, 16), (108, 112, 114)],
    "organ": [range(16, 21)],
    "reed": [range(21, 24), range(64, 72), (109, 111)],
    "guitar": [range(24, 32), range(104, 108)],
    "bass": [range(32, 40)],
    "string": [range(40, 47), range(48, 52), (110,)],
    "vocal": [range(52, 55), (91,)],
    "brass": [range(56, 64)],
    "flute": [range(72, 80)],
    "synth_lead": [range(80, 88)],
}
GM_FAMILY: dict[int, str] = {p: fam for fam, groups in _FAMILY_RANGES.items() for g in groups for p in g}

# NSynth sources: acoustic (sampled acoustic instruments), electronic (electric instruments), synthetic.
_ELECTRONIC = {2, 4, 5, 7, 16, 17, 18, 26, 27, 28, 29, 30, 31, 33, 34, 36, 37}
_SYNTHETIC = {38, 39, 50, 51, 54, 62, 63, 80, 81, 82, 83, 84, 85, 86, 87}
SYNTHETIC_ORIGINS = {"opl3"}  # an FM bank: every program is synthetic


def gm_source(program: int, origin: str) -> str:
    if origin in SYNTHETIC_ORIGINS or program in _SYNTHETIC:
        return "synthetic"
    return "electronic" if program in _ELECTRONIC else "acoustic"


def programs_for(families: tuple[str, ...] | None, programs: tuple[int, ...] | None) -> list[int]:
    """Usable GM programs of the chosen families (all 11 when None), optionally restricted to `programs`."""
    if families is not None:
        unknown = [f for f in families if f not in _FAMILY_RANGES]
        if unknown:
            raise ValueError(f"unknown instrument family {unknown}; NSynth families are {', '.join(_FAMILY_RANGES)}")
    chosen = [p for p in sorted(GM_FAMILY) if families is None or GM_FAMILY[p] in families]
    if programs is not None:
        unusable = [p for p in programs if p not in GM_FAMILY]
        if unusable:
            raise ValueError(f"GM programs {unusable} are drums, effects or unpitched and are not rendered")
        chosen = [p for p in chosen if p in programs]
    return chosen


def soundfonts_for(names: tuple[str, ...]) -> list[Soundfont]:
    unknown = [n for n in names if n not in SOUNDFONTS]
    if unknown:
        raise ValueError(f"unknown soundfont {unknown}; known: {', '.join(SOUNDFONTS)}")
    return [SOUNDFONTS[n] for n in names]
