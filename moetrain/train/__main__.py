"""``python -m moetrain.train`` and ``torchrun ... -m moetrain.train``."""

from moetrain.train.main import main

main()
