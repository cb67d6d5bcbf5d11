"""The tiny 2D Adam method config the Adam tests share (a depth-10 ResNet of widths 4-8, 32^2 views)."""

ADAM_TINY_2D: dict = {
    "name": "adam",
    "resnet_depth": 10,
    "resnet_widths": [4, 8, 8, 8],
    "in_channels": 1,
    "proj_hidden_dim": 16,
    "proj_dim": 8,
    "queue_size": 12,
    "view_size": 32,
    "blur_sigma": [0.1, 1.0],
}
