"""eep: prune and merge the experts of Mixture-of-Experts language models.

Importing eep registers its router-mapped model classes with transformers' Auto classes, so a
checkpoint exported from a `probs`-mode merged candidate loads with
`AutoModelForCausalLM.from_pretrained` after `import eep`. The registration waits until
transformers is imported (at once if it already is): importing transformers costs seconds, and
the search, config and dashboard modules never need it.
"""

import sys

from eep._after_import import call_after_import


def _register_mapped_classes() -> None:
    import eep.models.mapped  # noqa: F401, PLC0415  (registration is its import side effect)


if "transformers" in sys.modules:
    _register_mapped_classes()
else:
    call_after_import("transformers", "eep", _register_mapped_classes)

__version__ = "0.1.0"
