"""distill: move what one model knows into another.

>>> from transferkit.distill import distill
>>> res = distill(["runs/teacher"], "digits-usps", train, test, method="kd", config={"epochs": 5})  # doctest: +SKIP

Methods register under the registry stage ``distill`` (``transferkit distill --list``), one module per paper:

- :mod:`.kd`: ``kd`` — Hinton et al. 2015, one or several frozen teachers, cached teacher logits;
- :mod:`.nearest`: ``nearest`` / ``weighted`` — DistillNearest / DistillWeighted, Borup et al. ICCV'23;
- :mod:`.gains`: ``kl_dp`` and the flip analysis (:func:`flips`) — Fantastic Gains, Roth et al. ICLR'24;
- :mod:`.ncd`: ``ncd`` — class-relation KD for novel class discovery, Gu et al. ICCV'23 (:func:`cluster_accuracy`);
- :mod:`.aspects`: ``aspects`` — multi-aspect KD, Lee et al. CVPRW'25 (offline: a zoo model answers the aspects);
- :mod:`.robustify`: ``robustify`` — Efficiently Robustify Pre-trained Models, Jain et al. ICCV'23 (three heads);
- :mod:`.n2n`: ``n2n`` — N2N learning, Ashok et al. ICLR'18 (REINFORCE layer removal + shrinkage, KD-trained
  students) and :mod:`.tas`: ``tas`` — TAS, Dong & Yang NeurIPS'19 (width/depth search to a FLOP target, KD); both
  derive the student from the teacher's architecture (:mod:`.arch`, which registers nothing).

Teachers and students are catalogue models or ``transferkit tune`` run folders (:func:`load_net`); the
distilled student is saved as a Delta of its base model, in a folder that loads like a tune run (except
``ncd``'s and ``robustify``'s: their learners have several heads, and their folders do not load as teachers).
"""

from ._common import STAGE, DistillResult, Net, distill, load_net
from .. import registry  # noqa: E402  isort: skip

# each method module registers its methods on import; these first (the listing's order), then any other
# module of this package: a new method is one new module
registry.import_methods(__name__, __path__, first=("kd", "nearest", "gains", "ncd"), skip=("command",))
from .gains import flips
from .ncd import cluster_accuracy

__all__ = ["STAGE", "DistillResult", "Net", "distill", "load_net", "flips", "cluster_accuracy"]
