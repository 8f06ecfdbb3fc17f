"""Backbones. Protocol: `forward(images) -> list[Tensor]`, one stride-4 feature map per stack
(the last is used at test time), with attributes `out_channels: int` and `num_stacks: int`."""
