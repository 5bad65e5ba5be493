"""The evaluation suites, one file each; each takes its typed settings and returns the report.

* ``toy``: the toy world (``ToySettings``, ``toy_suite``; ``evaluate_toy`` is its keyword form);
* ``nudity``: NudeNet on benchmark prompts (``NuditySettings``, ``nudity_suite``);
* ``clip``: zero-shot concept accuracy with a local CLIP (``ClipSettings``, ``clip_suite``);
* ``fid``: FID and KID against reference images (``FidSettings``, ``fid_suite``).

``run_suite(settings)`` runs the suite a settings object belongs to.
"""

from engine.evaluation.suites.clip import ClipSettings, clip_suite
from engine.evaluation.suites.fid import FidSettings, fid_suite
from engine.evaluation.suites.nudity import NuditySettings, nudity_suite
from engine.evaluation.suites.toy import ToySettings, evaluate_toy, toy_suite

SUITES = {
    "toy": (ToySettings, toy_suite),
    "nudity": (NuditySettings, nudity_suite),
    "clip": (ClipSettings, clip_suite),
    "fid": (FidSettings, fid_suite),
}
REAL_SUITES = ("nudity", "clip", "fid")


def run_suite(settings, return_samples: bool = False):
    """The report of the suite whose settings ``settings`` are; with ``return_samples=True``,
    (report, samples): the before/after grid input of engine.evaluation.report.write_report, or
    None where the suite makes none."""
    for settings_type, suite in SUITES.values():
        if type(settings) is settings_type:
            return suite(settings, return_samples=return_samples)
    raise TypeError(f"not the settings of an evaluation suite: {type(settings).__name__}")


__all__ = [
    "SUITES",
    "REAL_SUITES",
    "run_suite",
    "ToySettings",
    "toy_suite",
    "evaluate_toy",
    "NuditySettings",
    "nudity_suite",
    "ClipSettings",
    "clip_suite",
    "FidSettings",
    "fid_suite",
]
