"""Mask R-CNN (ResNet50-FPN) as MindSpore cells with static shapes for graph mode."""
