"""Image embeddings: a Ray Data actor that runs a CLIP image tower over an images artifact.

``ImageEmbedder`` is the callable class; ``embed_images`` wires it into a Dataset as a fixed-size actor pool. The
``pcd-ray embed`` stage (``job.py``: GPU actors on a cluster, the ``embeddings`` artifact training reads), the
evaluation stage and training's inline path all use it.
"""

from pcd_ray.embed.images import ImageEmbedder, embed_images

__all__ = ["ImageEmbedder", "embed_images"]
