#!/usr/bin/env bash
# Set up pGESAM-RT on a fresh Debian (12+) machine: system packages, then a virtual environment in .venv with the
# engine, the training extra and the test tools. Idempotent; runs as root without prompts (uses sudo otherwise).
#
# Two packages are installed WITHOUT their dependencies: encodec 0.1.1 and torchcrepe 0.0.24 both import
# torchaudio, whose PyPI wheels fail against the CPU build of torch we pin; pgesam_train/compat.py gives them a
# stand-in torchaudio module (we never call their torchaudio code paths).
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
# FluidSynth and free General-MIDI soundfonts (dataset), PortAudio (audio out), libsndfile (WAV), liblo-tools (OSC tests),
# headless Chromium and its driver (the `pgesam web` browser test)
$SUDO apt-get install -y -q --no-install-recommends python3 python3-venv libfluidsynth3 libportaudio2 libsndfile1 \
    liblo-tools fluid-soundfont-gm musescore-general-soundfont fluidr3mono-gm-soundfont timgm6mb-soundfont \
    csound-soundfont opl3-soundfont chromium chromium-driver supercollider-language puredata-core

[ -x .venv/bin/python ] || python3 -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q "torch==2.13.0"            # the CPU build; an unpinned torch pulls a multi-GB CUDA build
$PIP install -q -e ".[train,test,web]"
$PIP install -q --no-deps "encodec==0.1.1" "torchcrepe==0.0.24"
# onnxruntime-gpu (Linux x86-64) and onnxruntime must not be installed side by side: keep the one pyproject chose.
if $PIP show -q onnxruntime-gpu 2>/dev/null && $PIP show -q onnxruntime 2>/dev/null; then
    $PIP uninstall -q -y onnxruntime
    $PIP install -q --force-reinstall --no-deps onnxruntime-gpu
fi
.venv/bin/python -c "import onnxruntime, torch, fluidsynth; print('pGESAM-RT environment ready:', \
'torch', torch.__version__, '| onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers())"
