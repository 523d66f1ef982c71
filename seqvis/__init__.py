"""seqvis: the sequence tools of computer vision, in JAX/Flax.

Subpackages: `seqvis.models` (pure Flax modules), `seqvis.data` (tfds -> numpy batches),
`seqvis.train` (the shared trainer), `seqvis.analysis` (FLOPs, fits, plots).
Importing `seqvis` has no side effects and imports none of its subpackages.
"""

__version__ = "0.1.0"
