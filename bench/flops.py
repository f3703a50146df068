"""Multiply-adds per image, counted from the model's layers (the paper's "FLOPs")."""

import keras

from repvgg_keras.structure import all_layers


def multiply_adds(model):
    """Conv2D and Dense multiply-adds for one image through a built functional model.

    RepVGG-A0's deploy form at 224x224 counts 1.36 G (the paper rounds to 1.4).
    """
    total = 0
    for layer in all_layers(model):
        if isinstance(layer, keras.layers.Conv2D):
            kernel_h, kernel_w, inputs_per_group, filters = layer.kernel.shape
            _, height, width, _ = layer.output.shape
            total += height * width * kernel_h * kernel_w * inputs_per_group * filters
        elif isinstance(layer, keras.layers.Dense):
            total += layer.kernel.shape[0] * layer.kernel.shape[1]
    return int(total)


def torch_multiply_adds(module, image_size):
    """The same count for a PyTorch module (timm's ResNets), through forward hooks."""
    import torch

    total = [0]

    def conv_hook(conv, inputs, output):
        kernel_h, kernel_w = conv.kernel_size
        total[0] += (
            output.shape[2]
            * output.shape[3]
            * kernel_h
            * kernel_w
            * conv.in_channels
            // conv.groups
            * conv.out_channels
        )

    def linear_hook(linear, inputs, output):
        total[0] += linear.in_features * linear.out_features

    hooks = []
    for sub in module.modules():
        if isinstance(sub, torch.nn.Conv2d):
            hooks.append(sub.register_forward_hook(conv_hook))
        elif isinstance(sub, torch.nn.Linear):
            hooks.append(sub.register_forward_hook(linear_hook))
    with torch.inference_mode():
        module(torch.zeros(1, 3, image_size, image_size))
    for hook in hooks:
        hook.remove()
    return int(total[0])
