"""Image embeddings: a Ray Data actor that runs a CLIP image tower over an images artifact.

``ImageEmbedder`` is the callable class; ``embed_images`` wires it into a Dataset as a fixed-size actor pool. The
evaluation stage uses it today; a standalone ``pcd-ray embed`` stage (GPU actors, an ``embeddings`` artifact) reuses
it unchanged.
"""

from pcd_ray.embed.images import ImageEmbedder, embed_images

__all__ = ["ImageEmbedder", "embed_images"]
