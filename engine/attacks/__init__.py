"""Attacks on erased models: does an erased concept come back?

* ``inversion`` (inversion.py): concept inversion, learned token embeddings (Pham et al., ICLR 2024);
* ``unlearndiff`` (unlearndiff.py): UnlearnDiffAtk's adversarial prompt tokens (Zhang et al., ECCV 2024);
* ``ring-a-bell`` (ring_a_bell.py): Ring-A-Bell's genetic search for a prompt near the concept
  vector, with the original model's text encoder only (Tsai et al., ICLR 2024);
* transfer rows: what an attack found on the original model, replayed on the edit;
* ``never_learned_control`` (control.py): the same attacks' rate on an identity the toy world
  never learned, the floor an erased identity's rate is compared with.

``run_attacks(AttackSettings(...))`` (runner.py) runs them on one concept and returns the report;
``erasure attack`` (cli.py) writes it. Shared parts (learned tokens in prompts, the denoising
loss, generation, judges) live in common.py.
"""

from engine.attacks.inversion import InversionSettings
from engine.attacks.ring_a_bell import RingABellSettings
from engine.attacks.runner import ATTACKS, AttackSettings, run_attacks
from engine.attacks.unlearndiff import UnlearnDiffSettings

__all__ = ["ATTACKS", "AttackSettings", "InversionSettings", "RingABellSettings", "UnlearnDiffSettings", "run_attacks"]
