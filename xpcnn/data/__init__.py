"""Data: datasets, pictures, augmentation, checkpoints on disk and the splits on the device."""
