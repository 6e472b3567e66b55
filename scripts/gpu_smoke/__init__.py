"""Helpers of scripts/gpu-smoke: the steps (steps.py), the offline bundle (bundle.py), both stdlib only, and the
checks the steps run with pcd-ray's interpreter (checks.py, which imports pcd-ray's dependencies)."""
