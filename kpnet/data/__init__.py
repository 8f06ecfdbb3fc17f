"""COCO-format data: datasets, augmentation, the synthetic `shapes` set, validation and converters."""
