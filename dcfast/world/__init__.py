"""The tiny procedural world: scenes drawn from named factors (shape, colour, fill, background) with their
concepts and task sequences (`scenes`), and the oracle CNN that reads the factors back from an image
(`oracle`). It is the yardstick's data, like a torchvision dataset: it neither trains nor evaluates.

May import: `dcfast.io`. The experiment runner that trains and judges methods on it is `dcfast.experiments`.
"""
