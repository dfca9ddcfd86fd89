"""Export and inference optimization of a trained artifact, each with a parity report.

- export.py    `tandem export`: ONNX fp32, int8 (dynamic or static QDQ), pruning, distilled
               students, the parity gate, written atomically next to model.pt
- quantize.py  ONNX Runtime quantization (dynamic for MLPs, static QDQ for convolutions)
- prune.py     magnitude pruning of Linear and Conv weights
- parity.py    accuracy and logit agreement of every exported engine against model.pt

May import: `cluster`, `serving` (its engines) and `training` (data and models to rebuild what
was trained). Nothing in online serving imports this package.
"""
