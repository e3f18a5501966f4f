"""Evaluation metrics: FID, FVD, E-FID (one Frechet distance), Sync-D / Sync-C, IQA, NFE-D."""
