"""adapt: cross a domain shift with unlabelled target data, and choose adapted models without target labels.

>>> from transferkit.adapt import adapt
>>> res = adapt(load_model("digits-usps"), source, target_train, target_test, method="tent")  # doctest: +SKIP
>>> res.metrics["accuracy"], res.metrics["source_only_accuracy"]                              # doctest: +SKIP

Each method registers where it lives in the one method registry (stage ``adapt``; ``transferkit adapt
--list``), with its paper and typed options:

- training-time domain adaptation: ``dann`` (:mod:`.dann`), ``paretoda`` (:mod:`.paretoda`), ``uda``
  consistency training (:mod:`.uda`);
- test-time adaptation on the held-out target stream, online: ``bn``, ``tent``, ``cotta``, ``reset``
  (:mod:`.tta`), ``vida`` (:mod:`.vida`);
- one-shot-style target mining: ``idm`` informative data mining (:mod:`.idm`);
- transductive zero-shot recognition of unseen target classes from several semantic views: ``tmv-zsl``
  (:func:`.zeroshot.zero_shot`, Python only: it does not fit source → target with shared classes);
- semi-supervised heterogeneous DA with k target labels per class (of the training part only): ``noise``
  (:mod:`.noise`);
- label-free model-selection scorers (registry ``kind="scorer"``, usable as engine scorers): ``entropy``,
  ``snd``, ``transfer_score``, ``iwv``, ``dev`` (:mod:`.scorers`, :func:`.scorers.make_scorer`); ``circular``,
  ``mixval``, ``mano`` (:mod:`.selection`).
"""

from .run import ADAPT_FILES, AdaptResult, adapt, check_method

from .. import registry  # noqa: E402  isort: skip

# each method module registers its methods on import; these first (the listing's order), then any other
# module of this package: a new method is one new module
registry.import_methods(__name__, __path__, first=("dann", "paretoda", "uda", "tta", "scorers"),
                        skip=("run", "command"))

__all__ = ["AdaptResult", "adapt", "check_method", "ADAPT_FILES"]
