"""The HPA dataset layer: reading the Kaggle layout, splits, synthetic data, packing, loaders."""
