"""Many-shot few-shot classification with GradNCP: the paper's Table 12 experiment.

Conv4 meta-trained with MAML and with GradNCP under the same measured memory budget on
N-way K-shot episodes (mini-ImageNet, or the offline stand-ins: glyph classes rendered from
fonts, and Fashion-MNIST). See ``examples/many_shot/README.md`` and
``docs/examples_many_shot.md``.
"""
