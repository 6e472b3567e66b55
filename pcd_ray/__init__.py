"""pcd-ray: finetune CLIP to reason about pairwise differences (PC-CLIP), from a laptop CPU to a Ray GPU cluster.

Nothing heavy is imported here: `pcd-ray --help` and config loading never load torch, ray or vllm.
"""

__version__ = "0.1.0"
