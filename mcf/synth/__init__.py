"""SynthFace: procedural faces with exact ground truth, written in the real datasets' formats.

Public API: :class:`SynthConfig`, :func:`render_face` → :class:`FaceSample`, and the writers
:func:`write_corpus`, :func:`write_aflw19`, :func:`write_lapa`.
"""

from mcf.synth.config import AflwSynthConfig, LapaSynthConfig, SynthConfig
from mcf.synth.identity import Identity, sample_identity
from mcf.synth.render import FaceSample, Scene, render_face, render_scene
from mcf.synth.writers import write_aflw19, write_corpus, write_lapa

__all__ = [
    "AflwSynthConfig", "FaceSample", "Identity", "LapaSynthConfig", "Scene", "SynthConfig", "render_face",
    "render_scene", "sample_identity", "write_aflw19", "write_corpus", "write_lapa",
]
