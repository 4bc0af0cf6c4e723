"""Data: image sources, multi-crop augmentation, iBOT masks, batches, shards."""
