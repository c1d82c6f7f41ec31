"""Packaging promises: the engine imports without torch; the encodec/torchcrepe shim works and is honest."""
from __future__ import annotations

import subprocess
import sys


def test_engine_imports_without_torch() -> None:
    code = "import sys, pgesam_engine; assert 'torch' not in sys.modules, 'pgesam_engine imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_encodec_and_torchcrepe_import_through_the_shim() -> None:
    code = ("from pgesam_train.compat import import_encodec, import_torchcrepe\n"
            "enc = import_encodec(); crepe = import_torchcrepe()\n"
            "assert hasattr(enc, 'EncodecModel') and hasattr(crepe, 'predict')\n"
            "import torchaudio\n"
            "if getattr(torchaudio, '__pgesam_stand_in__', False):\n"
            "    try:\n"
            "        torchaudio.load('x.wav')\n"
            "    except ImportError as e:\n"
            "        assert 'without torchaudio' in str(e)\n"
            "    else:\n"
            "        raise AssertionError('the stand-in must refuse to work')\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_help_is_fast_and_lists_commands() -> None:
    out = subprocess.run([sys.executable, "-c", "import sys; from pgesam_train.cli import main; "
                          "main(['--help'], standalone_mode=False); assert 'torch' not in sys.modules"],
                         check=True, capture_output=True, text=True).stdout
    assert "dataset" in out
