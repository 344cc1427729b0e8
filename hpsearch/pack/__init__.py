"""Trial packs: K nets of one structure trained together, each the training ``fit`` gives it.

The nets: MLP and CNN classifiers, and dense denoising / in-painting autoencoders.

A pack holds K slots. The study loop adds a trial into a free slot at any time (``Pack.add``),
steps the pack (``Pack.step``: every member takes its next batch of its own data stream), and
gets back the members that left during the step (``Departure``: completed, pruned or diverged),
each with its ``TrainResult`` and its own unpadded ``nn.Module``. See docs/workers.md.
"""

from hpsearch.pack._key import PACKABLE_FAMILIES, PACKABLE_TASKS, StructureKey, pack_refusal, structure_key
from hpsearch.pack._pack import Departure, Member, Pack

__all__ = ["PACKABLE_FAMILIES", "PACKABLE_TASKS", "Departure", "Member", "Pack", "StructureKey", "pack_refusal",
           "structure_key"]
