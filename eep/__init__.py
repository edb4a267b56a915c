"""eep: prune and merge the experts of Mixture-of-Experts language models.

Importing eep registers its router-mapped model classes with transformers' Auto classes, so a
checkpoint exported from a `probs`-mode merged candidate loads with
`AutoModelForCausalLM.from_pretrained` after `import eep`.
"""

import eep.models.mapped  # noqa: F401  (registration side effect, see docstring)

__version__ = "0.1.0"
